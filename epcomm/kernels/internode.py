"""High-throughput dispatch/combine across nodes (``cuda_src/internode.cuh``), NVSHMEM-linked.

Template arguments (:class:`InternodeSpec`): hidden size and payload dtype (the row copies have
compile-time trip counts).  Each module holds the prep and notify kernels and the dispatch's
send and receive; the BF16 module also holds the combine (stage, reduce, receive).  Rank and
node counts are runtime parameters (:class:`InterParams`).  :class:`InterLayout` is the heap
layout every rank computes alike.  Orchestration: :mod:`epcomm.internode`.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

from epcomm.jit.launch import launch
from epcomm.jit.spec import KernelDef, KernelSpec, ParamsStruct
from epcomm.kernels.words import pack_fields, unpack_fields
from epcomm.runtime import errstate
from epcomm.validate import check_hidden_size, check_int

MAX_RANKS = 256            # kInterMaxRanks
# The combine's reduction holds one staged-row address per lane, one lane per rank of the node.
MAX_RANKS_PER_NODE = 32    # kInterMaxRanksPerNode
MAX_TOPK = 32              # kInterMaxTopk: messages and partials are sized for it
MAX_LOCAL_EXPERTS = 256    # per-expert counts travel in the headers, sized for it
MAX_CHUNKS = 1024          # chunk flags per source node (chunk_rows grows for larger capacities)
MAX_CHUNK_ROWS = (1 << 16) - 1  # the shape word's field
THREADS = 512

_u64, _i64, _i32 = ctypes.c_uint64, ctypes.c_int64, ctypes.c_int32

PHASES = {
    60: "internode dispatch/send: waiting for the destination node's receivers to release our region "
        "(network hop: they have not finished the previous dispatch)",
    61: "internode dispatch/notify: waiting for the source's counts at its forwarder in this node (network hop)",
    62: "internode dispatch/receive: waiting for a chunk of the source's rows at its forwarder (network hop)",
    63: "internode combine/stage: waiting for this node's forwarders to release our staged rows (NVLink hop: "
        "they have not finished the previous combine)",
    64: "internode combine/reduce: waiting for a rank of this node to stage its rows (NVLink hop)",
    65: "internode combine/reduce: waiting for the source to release our partials region (network hop: it "
        "has not finished the previous combine)",
    66: "internode combine/receive: waiting for a chunk of partials from the node's forwarder (network hop)",
    67: "internode dispatch (a bad expert index)",
}
errstate.register_phases(PHASES, bad_index_phases={67: "dispatch"})


class InterParams(ParamsStruct):
    _cname_ = "epcomm::InterParams"
    _fields_ = [
        ("peer_base", _u64 * MAX_RANKS_PER_NODE), ("heap", _u64), ("ctrl", _u64), ("err", _u64), ("host_info", _u64),
        ("hdr_flag_off", _u64), ("hdr_off", _u64), ("hdr_stage_off", _u64), ("disp_ack_off", _u64),
        ("disp_flag_off", _u64), ("stage_flag_off", _u64), ("stage_ack_off", _u64), ("comb_ack_off", _u64),
        ("comb_flag_off", _u64), ("offsets_off", _u64), ("disp_recv_off", _u64), ("disp_send_off", _u64),
        ("comb_recv_off", _u64), ("comb_send_off", _u64), ("stage_off", _u64),
        ("x", _u64), ("x_scales", _u64), ("topk_idx", _u64), ("topk_weights", _u64), ("is_token_in_rank", _u64),
        ("num_tokens_per_expert", _u64),
        ("rank_pos", _u64), ("node_pos", _u64), ("node_list", _u64), ("rank_count", _u64), ("node_count", _u64),
        ("recv_offsets", _u64), ("fwd_count", _u64), ("fwd_pos", _u64),
        ("recv_x", _u64), ("recv_scales", _u64), ("recv_topk_idx", _u64), ("recv_topk_weights", _u64),
        ("recv_src_idx", _u64), ("out", _u64), ("out_weights", _u64), ("bias0", _u64), ("bias1", _u64),
        ("scale_st", _i64), ("scale_sg", _i64), ("rscale_st", _i64), ("rscale_sg", _i64),
        ("timeout_ns", _u64), ("shape_word", _u64),
        ("rank", _i32), ("num_ranks", _i32), ("rpn", _i32), ("num_nodes", _i32), ("node", _i32), ("local", _i32),
        ("num_tokens", _i32), ("num_topk", _i32), ("num_experts", _i32), ("hidden", _i32), ("fp8", _i32),
        ("expert_alignment", _i32), ("out_rows", _i32), ("worst_mode", _i32), ("write_host", _i32),
        ("chunk_rows", _i32), ("max_chunks", _i32), ("ncap", _i32), ("msg_stride", _i32), ("part_stride", _i32),
        ("stage_stride", _i32), ("hdr_stride", _i32), ("stage_rows", _i32), ("comb_rows", _i32),
    ]


class InterCtrl(ParamsStruct):
    """Mirror of epcomm::InterCtrl: the host allocates and zeroes it once; the kernels keep it."""
    _cname_ = "epcomm::InterCtrl"
    _fields_ = [("disp_tag", _u64), ("comb_tag", _u64), ("ok_tag", _u64), ("send_done", _i32), ("recv_done", _i32),
                ("stage_done", _i32), ("reduce_done", _i32), ("crecv_done", _i32), ("pad", _i32),
                ("src_slots", _i32 * MAX_RANKS)]


@dataclass(frozen=True)
class InternodeSpec(KernelSpec):
    """The module for ``hidden`` and the dispatch format ``fp8`` (the BF16 one holds the
    combine).  ``deepep``: a combine-only module in DeepEP V1's order (node partials rounded to
    bf16, biases first: the reduce and receive kernels' kDeepep)."""
    family = "internode"
    header = "internode.cuh"
    uses_nvshmem = True
    mirrors = (InterCtrl,)
    hidden: int
    fp8: bool
    deepep: bool = False

    def validate(self) -> None:
        if self.hidden <= 0:
            raise ValueError(f"hidden={self.hidden}: must be positive")
        check_hidden_size(self.hidden, fp8=self.fp8, name=None)
        if self.deepep and self.fp8:
            raise ValueError("deepep changes only the combine, whose module is the BF16 one (fp8=False)")

    def kernels(self):
        H, f = self.hidden, self.fp8
        out = []
        if not self.deepep:
            out += [KernelDef("prep", "epcomm::internode_prep", (THREADS,), InterParams),
                    KernelDef("notify", "epcomm::internode_dispatch_notify", (THREADS,), InterParams),
                    KernelDef("send", "epcomm::internode_dispatch_send", (H, f), InterParams),
                    KernelDef("recv", "epcomm::internode_dispatch_recv", (H, f), InterParams)]
        if not f:  # combine is BF16 whatever the dispatch's format: one copy per hidden size
            flag = (True,) if self.deepep else ()
            out += [KernelDef("stage", "epcomm::internode_combine_stage", (H,), InterParams),
                    KernelDef("reduce", "epcomm::internode_combine_reduce", (H,) + flag, InterParams),
                    KernelDef("crecv", "epcomm::internode_combine_recv", (H,) + flag, InterParams)]
        return tuple(out)


def _align(n: int, a: int = 16) -> int:
    return (n + a - 1) // a * a


def msg_stride(hidden: int, num_ranks: int) -> int:
    """Bytes of a dispatch message: the largest payload (BF16) + source index + MAX_TOPK expert
    ids and weights + the token's index at every rank."""
    return _align(2 * hidden + 4 + 8 * MAX_TOPK + 4 * num_ranks)


def part_stride(hidden: int) -> int:
    """Bytes of a combine partial: fp32 [H] + MAX_TOPK weights."""
    return _align(4 * hidden + 4 * MAX_TOPK)


def stage_stride(hidden: int) -> int:
    """Bytes of a staged combine row: bf16 [H] + MAX_TOPK weights."""
    return _align(2 * hidden + 4 * MAX_TOPK)


def hdr_stride(ranks_per_node: int) -> int:
    return _align(16 + 4 * ranks_per_node + 4 * ranks_per_node * MAX_LOCAL_EXPERTS)


@dataclass(frozen=True)
class InterLayout:
    """Byte offsets inside every rank's symmetric heap.  The control words (flags,
    acknowledgements, headers) sit first at offsets that depend only on the rank and node counts,
    so ranks that disagree on a call's shape still meet there (and detect it); the regions
    after them are sized for the hidden size of the call.  ``ncap``: slots per source node in
    each region (the most tokens a rank may dispatch); ``stage_rows``: rows the combine can
    stage (the most rows a rank may receive)."""

    hdr_flag_off: int
    hdr_off: int
    hdr_stage_off: int
    disp_ack_off: int
    disp_flag_off: int
    stage_flag_off: int
    stage_ack_off: int
    comb_ack_off: int
    comb_flag_off: int
    offsets_off: int
    disp_recv_off: int
    disp_send_off: int
    comb_recv_off: int
    comb_send_off: int
    stage_off: int
    ncap: int
    stage_rows: int
    msg_stride: int
    part_stride: int
    stage_stride: int
    hdr_stride: int
    total: int

    @staticmethod
    def control_bytes(R: int, P: int) -> int:
        M = R // P
        return _align(8 * R + 8 * M + 8 * M * MAX_CHUNKS + 8 * MAX_RANKS_PER_NODE + 8 + 8 * M
                      + 8 * M * MAX_CHUNKS + 4 * (R + 1), 4096) + _align((R + M) * hdr_stride(P), 4096)

    @classmethod
    def make(cls, R: int, P: int, H: int, rdma_bytes: int, nvl_bytes: int) -> "InterLayout":
        """``rdma_bytes`` hold the control words and the four regions, ``nvl_bytes`` the stage."""
        M = R // P
        o = 0

        def take(n: int) -> int:
            nonlocal o
            at = o
            o = _align(o + n, 16)
            return at

        hs = hdr_stride(P)
        hdr_flag = take(8 * R)
        disp_ack = take(8 * M)
        disp_flag = take(8 * M * MAX_CHUNKS)
        stage_flag = take(8 * MAX_RANKS_PER_NODE)
        stage_ack = take(8)
        comb_ack = take(8 * M)
        comb_flag = take(8 * M * MAX_CHUNKS)
        offsets = take(4 * (R + 1))
        o = _align(o, 4096)
        hdr = take(R * hs)
        hdr_stage = take(M * hs)
        o = _align(o, 4096)
        ctrl_end = o
        if rdma_bytes < ctrl_end:
            raise ValueError(f"num_rdma_bytes={rdma_bytes}: {R} ranks in nodes of {P} need at least {ctrl_end} bytes "
                             f"of control words, plus the regions (Buffer.get_rdma_buffer_size_hint)")
        ms, ps, ss = msg_stride(H, R), part_stride(H), stage_stride(H)
        ncap = max(0, (rdma_bytes - ctrl_end) // (2 * M * (ms + ps)))
        disp_recv = ctrl_end
        disp_send = disp_recv + M * ncap * ms
        comb_recv = disp_send + M * ncap * ms
        comb_send = comb_recv + M * ncap * ps
        stage = _align(max(rdma_bytes, comb_send + M * ncap * ps), 4096)
        stage_rows = nvl_bytes // ss
        return cls(hdr_flag, hdr, hdr_stage, disp_ack, disp_flag, stage_flag, stage_ack, comb_ack, comb_flag, offsets,
                   disp_recv, disp_send, comb_recv, comb_send, stage, ncap, stage_rows, ms, ps, ss, hs,
                   stage + stage_rows * ss)


def rdma_size_hint(hidden: int, num_ranks: int, ranks_per_node: int, num_max_tokens_per_rank: int) -> int:
    """``num_rdma_bytes`` for internode dispatches of up to ``num_max_tokens_per_rank`` tokens
    (any top-k <= MAX_TOPK, BF16 or FP8) and their combines."""
    R, P = check_topology(num_ranks, ranks_per_node)
    H = check_hidden_size(check_int("hidden", hidden, lo=8), name=None)
    N = check_int("num_max_tokens_per_rank", num_max_tokens_per_rank, lo=1)
    M = R // P
    return _align(InterLayout.control_bytes(R, P) + 2 * M * N * (msg_stride(H, R) + part_stride(H)), 4096)


def nvl_size_hint(hidden: int, num_max_recv_tokens: int) -> int:
    """``num_nvl_bytes`` for combines of up to ``num_max_recv_tokens`` received rows."""
    H = check_hidden_size(check_int("hidden", hidden, lo=8), name=None)
    return stage_stride(H) * check_int("num_max_recv_tokens", num_max_recv_tokens, lo=1)


def check_topology(num_ranks: int, ranks_per_node: int) -> tuple[int, int]:
    """(R, P) checked for the internode kernels: 2 <= R <= MAX_RANKS, 1 <= P <= MAX_RANKS_PER_NODE,
    P divides R and R > P (at least two nodes)."""
    R = check_int("num_ranks", num_ranks, lo=2, hi=MAX_RANKS)
    P = check_int("ranks_per_node", ranks_per_node, lo=1, hi=MAX_RANKS_PER_NODE)
    if R % P:
        raise ValueError(f"ranks_per_node={P} does not divide num_ranks={R}")
    if R == P:
        raise ValueError(f"num_ranks={R} with ranks_per_node={P} is one node: the intranode mode serves it")
    return R, P


# Shape word of a dispatch (InterParams.shape_word), compared by every receiver with its own.
_SHAPE_FIELDS = (("hidden", 18), ("fp8", 1), ("num_topk", 6), ("num_experts", 17), ("chunk_rows", 16))


@functools.lru_cache(maxsize=256)  # every dispatch asks
def shape_word(H: int, fp8: bool, K: int, E: int, chunk_rows: int) -> int:
    return pack_fields(_SHAPE_FIELDS, (H, int(fp8), K, E, chunk_rows), "internode")


def unpack_shape_word(w: int) -> dict[str, int]:
    return unpack_fields(_SHAPE_FIELDS, w)


errstate.register_shape_word(61, unpack_shape_word, "dispatch",
                             "hidden size, dtype, top-k width, num_experts and Config (chunk rows)")


# ---- launchers (``mod``: the loaded module of an InternodeSpec) ----
def launch_prep(mod, stream: int, p: InterParams) -> None:
    """One block per rank and per node: the send plan of this rank's tokens."""
    launch(mod.fn("prep"), p.num_ranks + p.num_nodes, THREADS, stream, p)


def launch_send(mod, stream: int, p: InterParams, blocks: int) -> None:
    launch(mod.fn("send"), blocks, THREADS, stream, p)


def launch_notify(mod, stream: int, p: InterParams) -> None:
    launch(mod.fn("notify"), 1, THREADS, stream, p)


def launch_recv(mod, stream: int, p: InterParams, blocks: int) -> None:
    launch(mod.fn("recv"), blocks, THREADS, stream, p)


def launch_combine(mod, stream: int, p: InterParams, blocks: int) -> None:
    """Stage, reduce and receive, in stream order (each waits only on earlier kernels' flags)."""
    for name in ("stage", "reduce", "crecv"):
        launch(mod.fn(name), blocks, THREADS, stream, p)
