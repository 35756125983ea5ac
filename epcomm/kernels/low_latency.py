"""Low-latency dispatch/combine kernels (``cuda_src/low_latency.cuh``), NVSHMEM-linked.

Template arguments (:class:`LowLatencySpec`): hidden size and whether dispatch casts to FP8;
each module holds the send-only, receive-only and fused variants of dispatch and, in the BF16
module only, of combine (the receive hook launches the receive-only one).  Two option flags make
further modules: ``deepep`` (DeepEP V1's arithmetic: FP8 scales in an FP8 module, FMA sums in a
combine-only one) and ``logfmt`` (the LogFMT-10 combine, combine-only).  The rank count is a
runtime parameter.  Runtime parameters: :class:`LLParams`.  Orchestration:
:mod:`epcomm.low_latency`.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

from epcomm.jit.launch import launch, launch_prepared
from epcomm.jit.spec import KernelDef, KernelSpec, ParamsStruct
from epcomm.kernels.words import pack_fields, unpack_fields
from epcomm.runtime import errstate
from epcomm.validate import check_experts_divisible, check_hidden_size, check_int

MAX_RANKS = 64
MAX_TOPK = 32
THREADS = 512
WARPS = THREADS // 32
PHASE_SEND, PHASE_RECV, PHASE_BOTH = 1, 2, 3

_u64, _i32 = ctypes.c_uint64, ctypes.c_int32


class LLParams(ParamsStruct):
    _cname_ = "epcomm::LLParams"
    _fields_ = [
        ("peer_base", _u64 * MAX_RANKS), ("heap", _u64), ("ctrl", _u64), ("err", _u64),
        ("disp_flag_off", _u64), ("comb_flag_off", _u64), ("disp_ack_off", _u64), ("comb_ack_off", _u64),
        ("disp_shape_off", _u64),
        ("disp_region_off", _u64), ("comb_region_off", _u64), ("disp_send_off", _u64), ("comb_send_off", _u64),
        ("comb_wflag_off", _u64), ("comb_w_off", _u64),
        ("x", _u64), ("topk_idx", _u64), ("topk_weights", _u64),
        ("recv_x", _u64), ("recv_scales", _u64), ("recv_count", _u64), ("recv_src_info", _u64),
        ("recv_layout_range", _u64), ("recv_src_k", _u64), ("recv_tok_rows", _u64), ("recv_tok_meta", _u64),
        ("cumulative_stats", _u64),
        ("h_count", _u64), ("h_range", _u64), ("h_src_info", _u64), ("h_src_k", _u64),
        ("h_tok_rows", _u64), ("h_tok_meta", _u64), ("out", _u64),
        ("timeout_ns", _u64), ("shape_word", _u64),
        ("rank", _i32), ("num_ranks", _i32), ("num_tokens", _i32), ("num_topk", _i32), ("num_experts", _i32),
        ("max_tokens", _i32), ("slot", _i32), ("msg_bytes", _i32), ("hdr_bytes", _i32), ("round_scale", _i32),
        ("use_ue8m0", _i32), ("zero_copy", _i32), ("force_put", _i32), ("any_put", _i32), ("check_shape", _i32),
        ("h_slot", _i32), ("partials", _i32), ("prof", _u64),
        ("wait_stats", _u64), ("lf_meta_off", _u64), ("lf_stage_off", _u64),
        ("mask_off", _u64), ("shrink", _i32), ("pad2", _i32),
    ]


# EPCOMM_PROFILE stamps (ll_stamp in low_latency.cuh): per kernel, block and phase, the
# globaltimer when the block finished that phase.
PROF_BLOCKS, PROF_SLOTS = 512, 8
PROF_PHASES = {
    "dispatch": ("start", "send: acks waited", "send: tokens written", "send: arrived at destinations",
                 "recv: flags arrived", "recv: headers scanned", "recv: rows placed", "end"),
    "combine": ("start", "send: acks waited", "send: token list built", "send: items done (warp 0)",
                "send: arrived at destinations", "recv: flags arrived", "recv: items done (warp 0)", "end"),
}


class LLCtrl(ParamsStruct):
    """Mirror of epcomm::LLCtrl (device control words; the host allocates and zeroes it)."""
    _cname_ = "epcomm::LLCtrl"
    _fields_ = [("disp_seq", _u64 * 2), ("comb_seq", _u64 * 2), ("disp_base", (_u64 * MAX_RANKS) * 2),
                ("comb_base", (_u64 * MAX_RANKS) * 2), ("disp_send_done", _i32 * 2), ("comb_send_done", _i32 * 2),
                ("disp_recv_done", _i32 * 2), ("comb_recv_done", _i32 * 2),
                ("failed", _i32), ("pad", _i32), ("layout", _u64)]


# ll_combine's kMode bits (low_latency.cuh: kLLCombFma, kLLCombLogfmt).
COMB_FMA, COMB_LOGFMT = 1, 2


@dataclass(frozen=True)
class LowLatencySpec(KernelSpec):
    """A low-latency module.  Without flags: the dispatch of ``fp8``'s format (and, BF16 only,
    the combine).  ``deepep``: DeepEP V1's arithmetic where it differs: with ``fp8`` the FP8
    dispatch with DeepEP's scales (``ll_dispatch<..., true>``), without it the combine that sums
    with FMA (kMode COMB_FMA); a BF16 dispatch is the same either way, so that module has none.
    ``logfmt``: the LogFMT-10 combine (kMode COMB_LOGFMT, plus COMB_FMA with ``deepep``), BF16
    only.  Flag modules hold only the kernels that differ."""
    family = "low_latency"
    header = "low_latency.cuh"
    uses_nvshmem = True
    mirrors = (LLCtrl,)
    hidden: int
    fp8: bool
    deepep: bool = False
    logfmt: bool = False

    @property
    def min_sm(self) -> int:
        return 89 if self.fp8 else super().min_sm  # the FP8 cast: cvt.rn.satfinite.e4m3x2.f32

    def validate(self) -> None:
        if self.hidden <= 0 or self.hidden % 128:
            raise ValueError(f"hidden={self.hidden}: the low-latency kernels need a multiple of 128")
        if self.logfmt and self.fp8:
            raise ValueError("logfmt is a combine format; the combine module is the BF16 one (fp8=False)")

    @property
    def combine_mode(self) -> int:
        """ll_combine's kMode in this module."""
        return (COMB_FMA if self.deepep else 0) | (COMB_LOGFMT if self.logfmt else 0)

    def kernels(self):
        H, f = self.hidden, self.fp8
        phases = (("send", PHASE_SEND), ("recv", PHASE_RECV), ("both", PHASE_BOTH))
        out = []
        if f or not (self.deepep or self.logfmt):
            extra = (True,) if self.deepep else ()  # kDeepepScale (absent: the default false)
            for name, ph in phases:
                out.append(KernelDef(f"dispatch_{name}", "epcomm::ll_dispatch", (H, f, ph) + extra, LLParams))
        if not f:  # combine is bf16 whatever the dispatch format: one copy per hidden size
            mode = (self.combine_mode,) if self.combine_mode else ()
            for name, ph in phases:
                out.append(KernelDef(f"combine_{name}", "epcomm::ll_combine", (H, ph) + mode, LLParams))
        return tuple(out)


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


# The heap layout depends only on (T, H, E, R): messages are sized for the largest form (BF16
# payload, MAX_TOPK expert ids) and the combine region for MAX_TOPK rows per token, so calls
# with another dtype or top-k never move a region (stale bytes of another layout could
# otherwise be misread as a message header).
HDR_BYTES = 80  # tag (8 bytes) + MAX_TOPK int16 expert ids, rounded up to 16


def dispatch_smem_bytes(num_ranks: int, max_tokens: int) -> int:
    """Dynamic shared memory of the dispatch receive (layout in ll_dispatch_recv): per 32-slot
    group a count, per slot a packed-row entry (4 bytes) and its matching k (1 byte)."""
    slots = num_ranks * max_tokens
    groups = num_ranks * ((max_tokens + 31) // 32)
    return _align(4 * groups + 4 * slots + slots, 16)


def combine_smem_bytes(num_ranks: int, max_tokens: int) -> int:
    """Dynamic shared memory of the combine send (layout in ll_combine_send): per 32-token group
    of each source a mask and a prefix (8 bytes), per source token a list entry (4 bytes)."""
    groups = num_ranks * ((max_tokens + 31) // 32)
    return _align(8 * groups + 4 * num_ranks * max_tokens, 16)


def msg_bytes(hidden: int) -> int:
    """Message stride: header plus the largest payload (BF16) for ``hidden`` channels."""
    bf16 = hidden * 2
    fp8 = hidden + 4 * (hidden // 128)
    return _align(HDR_BYTES + max(bf16, fp8), 16)


def mask_offset(num_ranks: int) -> int:
    """Byte offset of the rank mask (int32 [R], shrink mode) in every rank's symmetric heap:
    after the flags, acknowledgements and shape words, at the same place for every shape."""
    return 6 * 2 * num_ranks * 8


@dataclass(frozen=True)
class HeapLayout:
    """Byte offsets inside every rank's symmetric heap for one (T, H, E, R) (K is fixed at
    MAX_TOPK).  ``disp_send_end``: the end of the dispatch's put staging, the last place a
    message header of this shape may sit.  ``total``: what every call needs; the LogFMT
    combine's group words come after it (``lf_meta_off``, ``lf_stage_off``), up to
    ``lf_total``, the size hint (so a call without LogFMT never needs them, and the offsets of
    everything else do not depend on them)."""

    disp_flag_off: int
    comb_flag_off: int
    disp_ack_off: int
    comb_ack_off: int
    disp_shape_off: int
    comb_wflag_off: int
    disp_region_off: int
    comb_w_off: int
    comb_region_off: int
    disp_send_off: int
    comb_send_off: int
    total: int
    msg_bytes: int
    disp_send_end: int = 0
    lf_meta_off: int = 0
    lf_stage_off: int = 0
    lf_total: int = 0

    @classmethod
    def make(cls, T: int, H: int, E: int, R: int) -> "HeapLayout":
        K = MAX_TOPK
        ctrl = 2 * R * 8
        # Flags, acknowledgements and shape words first: their offsets do not depend on T, H
        # or E, so ranks that disagree on those still meet there (and detect it).
        df, cf, da, ca, sh, wf = 0, ctrl, 2 * ctrl, 3 * ctrl, 4 * ctrl, 5 * ctrl
        m = msg_bytes(H)
        dr = _align(mask_offset(R) + R * 4, 4096)
        cw = _align(dr + 2 * R * T * m, 4096)    # combine weights of each source: f32 [2][R][T][K]
        cr = _align(cw + 2 * R * T * K * 4, 4096)
        ds = _align(cr + 2 * T * K * H * 2, 4096)
        cs = _align(ds + 2 * T * m, 4096)
        total = _align(cs + 2 * E * T * H * 2, 4096)
        # LogFMT: a u64 per 128-channel group of every arriving row [2][T][K][G], and of every
        # row staged for a put [2][E/R][R*T][G] (E/R * R*T = E*T rows).
        G = H // 128
        lm = total
        lst = _align(lm + 2 * T * K * G * 8, 4096)
        lf_total = _align(lst + 2 * E * T * G * 8, 4096)
        return cls(df, cf, da, ca, sh, wf, dr, cw, cr, ds, cs, total, m, ds + 2 * T * m, lm, lst, lf_total)


# Shape word of a dispatch (LLParams.shape_word): every field a receiver needs to read a
# source's messages, packed exactly so the host can name the fields that differ.
# The last two are the buffers' transport settings, which decide how combine rows travel.
_SHAPE_FIELDS = (("num_max_dispatch_tokens_per_rank", 20), ("hidden/128", 10), ("num_experts", 15),
                 ("num_topk", 6), ("use_fp8", 1), ("round_scale", 1), ("use_ue8m0", 1),
                 ("EPCOMM_LL_FORCE_NVSHMEM_PUT", 1), ("EPCOMM_LL_COMBINE_PARTIALS", 1))


@functools.lru_cache(maxsize=256)  # every full-path dispatch (the hook path included) asks
def shape_word(T: int, H: int, E: int, K: int, fp8: bool, round_scale: bool, ue8m0: bool,
               force_put: bool = False, partials: bool = True) -> int:
    """Pack a dispatch's shape (T < 2**20, H % 128 == 0 and H < 2**17, E < 2**15, K < 64) and
    the buffer's transport settings."""
    vals = (T, H // 128, E, K, int(fp8), int(round_scale), int(ue8m0), int(force_put), int(partials))
    return pack_fields(_SHAPE_FIELDS, vals, "low-latency")


def unpack_shape_word(w: int) -> dict[str, int]:
    """The fields of a shape word, by argument name (hidden in channels)."""
    return {("hidden" if k == "hidden/128" else k): (v * 128 if k == "hidden/128" else v)
            for k, v in unpack_fields(_SHAPE_FIELDS, w).items()}


# The receive of a dispatch records two shape words when ranks disagree (kPhaseLLDispatchRecv).
errstate.register_shape_word(31, unpack_shape_word)


def check_shape(T, H, E, R) -> tuple[int, int, int, int]:
    """Validate a low-latency shape against the kernels' limits (those of the shape word):
    1 <= T < 2**20 tokens per rank, hidden H a multiple of 128 below 2**17, 1 <= R <= 64 ranks,
    E a multiple of R below 2**15.  Returns (T, H, E, R) as ints; raises TypeError/ValueError
    naming the argument."""
    T = check_int("num_max_dispatch_tokens_per_rank", T, lo=1, hi=(1 << 20) - 1)
    H = check_int("hidden", H, lo=128, hi=128 * 1023)
    check_hidden_size(H, low_latency=True, name=None)
    R = check_int("num_ranks", R, lo=1, hi=MAX_RANKS)
    E = check_int("num_experts", E, lo=1)
    check_experts_divisible(E, R)
    if E > 32767:
        raise ValueError(f"num_experts={E}: at most 32767 (expert ids travel as int16)")
    return T, H, E, R


def rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """Symmetric-heap bytes per rank for low-latency calls of up to these sizes (any top-k <= 32,
    LogFMT combines included).  Raises TypeError/ValueError for a shape the kernels cannot run
    (:func:`check_shape`)."""
    T, H, E, R = check_shape(num_max_dispatch_tokens_per_rank, hidden, num_experts, num_ranks)
    return HeapLayout.make(T, H, E, R).lf_total


# ---- launchers (``mod``: the loaded module of a LowLatencySpec; ``name``: one of its kernels) ----
def launch_half(mod, name: str, blocks: int, stream: int, p: LLParams, smem: int) -> None:
    """One half of a call split by a receive hook (``*_send`` or ``*_recv``)."""
    launch(mod.fn(name), blocks, THREADS, stream, p, smem=smem)


def launch_both(fn, grid: int, stream: int, p: LLParams, smem: int) -> None:
    """The send and receive of one call in one cooperative grid (``fn``: ``*_both``)."""
    launch(fn, grid, THREADS, stream, p, smem=smem, cooperative=True)


def launch_plan(fn, grid: int, stream: int, args, smem: int) -> None:
    """:func:`launch_both` with a prepared argument array (the fast paths)."""
    launch_prepared(fn, grid, THREADS, stream, args, smem, True)
