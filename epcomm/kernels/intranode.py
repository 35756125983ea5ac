"""High-throughput dispatch/combine inside one NVLink domain (``cuda_src/intranode.cuh``).

Template arguments (:class:`IntranodeDispatchSpec`, :class:`IntranodeCombineSpec`): rank count,
hidden size and payload dtype, so the row copies have compile-time trip counts.  Runtime
parameters: :class:`IntraParams`, the mirror of ``epcomm::IntraParams``.  This module describes
the kernels (specs, parameter mirrors, layout sizes) and launches them (``launch_*``); the
orchestration (buffers, streams, the CPU synchronisation of the non-graph path) lives in
:mod:`epcomm.normal`.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

from epcomm.jit.launch import launch
from epcomm.jit.spec import KernelDef, KernelSpec, ParamsStruct
from epcomm.runtime import errstate

MAX_RANKS = 72          # kIntraMaxRanks: one NVLink domain
THREADS = 512           # kIntraThreads
NOTIFY_THREADS = 1024
MAX_CHUNKS = 1024       # chunks per source rank (chunk_rows grows for larger capacities)
CHUNK_FLAG_SLOTS = THREADS // 32  # kChunkFlagSlots: one arrival flag per sending warp
MAX_LOCAL_EXPERTS = 1023
# Upper bounds of two int32 fields of IntraParams, where the kernels compute in 32 bits:
# * chunk_rows: ChunkPlan (intranode.cuh) forms rows + CR - 1 and tail * (CR / 4) with
#   tail = kTailChunks <= 16; 2**24 rows keeps both far from 2**31 for any row count a staging
#   region can realistically hold, and a larger chunk would only mean one chunk per source.
# * expert_alignment: the notify kernel rounds each per-expert count c up as (c + a - 1) / a * a;
#   2**20 keeps that below 2**31 for every count below 2**31 - 2**20 (the alignments in use are
#   GEMM tile heights, 1 to a few hundred rows).
MAX_CHUNK_ROWS = 1 << 24
MAX_EXPERT_ALIGNMENT = 1 << 20
# Words of a dispatch that every rank must agree on, exchanged in the mailbox with the counts
# (mailbox_agree_field in intranode.cuh, same order); a difference raises RankMismatchError.
MAILBOX_AGREE_FIELDS = ("hidden", "fp8", "num_topk", "num_experts", "chunk_rows")
MAILBOX_INTS = 1 + len(MAILBOX_AGREE_FIELDS) + MAX_LOCAL_EXPERTS
errstate.register_mailbox_fields(MAILBOX_AGREE_FIELDS)
PROF_MAX_BLOCKS = 256   # kProfMaxBlocks
PROF_SLOTS = 4          # kProfSlots: start ns, end ns, SM id, clock cycles
PROF_KERNELS = ("notify", "send", "recv", "combine")  # ProfKernel order

_u64, _i64, _i32 = ctypes.c_uint64, ctypes.c_int64, ctypes.c_int32


class IntraParams(ParamsStruct):
    _cname_ = "epcomm::IntraParams"
    _fields_ = [
        ("peers", _u64 * MAX_RANKS), ("ctrl", _u64), ("err", _u64), ("host_info", _u64),
        ("ack_off", _u64), ("mailbox_tag_off", _u64), ("mailbox_off", _u64), ("flags_off", _u64),
        ("staging_off", _u64), ("region_bytes", _u64),
        ("x", _u64), ("x_scales", _u64), ("topk_idx", _u64), ("topk_weights", _u64),
        ("is_token_in_rank", _u64), ("num_tokens_per_expert", _u64),
        ("send_list", _u64), ("send_pos", _u64), ("send_count", _u64), ("rank_prefix", _u64),
        ("recv_x", _u64), ("recv_scales", _u64), ("recv_topk_idx", _u64), ("recv_topk_weights", _u64),
        ("recv_src_idx", _u64), ("out", _u64), ("out_weights", _u64), ("bias0", _u64), ("bias1", _u64),
        ("scale_st", _i64), ("scale_sg", _i64), ("rscale_st", _i64), ("rscale_sg", _i64),
        ("timeout_ns", _u64),
        ("rank", _i32), ("num_ranks", _i32), ("num_tokens", _i32), ("num_topk", _i32),
        ("num_experts", _i32), ("expert_alignment", _i32), ("out_rows", _i32), ("worst_mode", _i32),
        ("chunk_rows", _i32), ("row_bytes", _i32), ("mailbox_ints", _i32), ("max_chunks", _i32),
        ("hidden", _i32), ("fp8", _i32),
        ("cached", _i32), ("write_host", _i32), ("num_send_blocks", _i32), ("speculative", _i32),
        ("prof", _u64), ("mask_off", _u64), ("shrink", _i32), ("pad2", _i32),
    ]


class CompactScalesParams(ParamsStruct):
    """Mirror of epcomm::CompactScalesParams (column-major scales of a speculative receive)."""
    _cname_ = "epcomm::CompactScalesParams"
    _fields_ = [("src", _u64), ("dst", _u64), ("src_ld", _i64), ("rows", _i64), ("groups", _i32), ("pad", _i32)]


COMPACT_THREADS = 256


class IntraCtrl(ParamsStruct):
    """Mirror of epcomm::IntraCtrl: the host allocates and zeroes it once; the kernels keep it."""
    _cname_ = "epcomm::IntraCtrl"
    _fields_ = [("op_seq", _u64), ("cur_tag", _u64), ("ok_tag", _u64), ("scan_done", _i32), ("recv_done", _i32),
                ("comb_done", _i32), ("pad", _i32), ("recv_heads", _i32 * MAX_RANKS)]


def _check_ranks(num_ranks: int) -> None:
    if not 2 <= num_ranks <= MAX_RANKS:
        raise ValueError(f"num_ranks={num_ranks}: intranode kernels support 2..{MAX_RANKS} ranks")


@dataclass(frozen=True)
class IntranodeDispatchSpec(KernelSpec):
    """notify + send + receive kernels of one (ranks, hidden, dtype) specialization."""

    family = "intranode_dispatch"
    header = "intranode.cuh"
    mirrors = (IntraCtrl,)
    num_ranks: int
    hidden: int
    fp8: bool

    def validate(self) -> None:
        _check_ranks(self.num_ranks)
        if self.hidden <= 0:
            raise ValueError(f"hidden={self.hidden}: must be positive")
        if self.fp8 and self.hidden % 128:
            raise ValueError(f"hidden={self.hidden}: FP8 dispatch needs a multiple of 128 (one scale per 128 channels)")
        if not self.fp8 and self.hidden % 8:
            raise ValueError(f"hidden={self.hidden}: BF16 dispatch needs a multiple of 8 (16-byte rows)")

    def render(self) -> str:
        # The host sizes chunks with the Python mirror of kTailChunks: the compiler checks it.
        t = dispatch_tail_chunks(self.num_ranks)
        return super().render() + (f"static_assert(epcomm::kTailChunks<{self.num_ranks}> == {t}, "
                                   f'"kTailChunks differs from dispatch_tail_chunks()");\n'
                                   f"static_assert(epcomm::kMailboxAgree == {len(MAILBOX_AGREE_FIELDS)}, "
                                   f'"kMailboxAgree differs from MAILBOX_AGREE_FIELDS");\n')

    def kernels(self):
        R, H, f = self.num_ranks, self.hidden, self.fp8
        ks = (
            KernelDef("notify", "epcomm::intranode_notify", (R,), IntraParams),
            KernelDef("send", "epcomm::intranode_dispatch_send", (R, H, f), IntraParams),
            KernelDef("recv", "epcomm::intranode_dispatch_recv", (R, H, f), IntraParams),
        )
        if f:
            ks += (KernelDef("compact_scales", "epcomm::intranode_compact_scales", (COMPACT_THREADS,),
                             CompactScalesParams),)
        return ks


@dataclass(frozen=True)
class IntranodeCombineSpec(KernelSpec):
    """The combine for ``num_ranks`` and ``hidden``; ``deepep``: DeepEP V1's order, the biases
    before the ranks (the kernel's kBiasFirst)."""
    family = "intranode_combine"
    header = "intranode.cuh"
    mirrors = (IntraCtrl,)
    num_ranks: int
    hidden: int
    deepep: bool = False

    def validate(self) -> None:
        _check_ranks(self.num_ranks)
        if self.hidden <= 0 or self.hidden % 8:
            raise ValueError(f"hidden={self.hidden}: combine needs a multiple of 8 (16-byte bf16 rows)")

    def kernels(self):
        targs = (self.num_ranks, self.hidden) + ((True,) if self.deepep else ())
        return (KernelDef("combine", "epcomm::intranode_combine", targs, IntraParams),)


def dispatch_tail_chunks(num_ranks: int) -> int:
    """Small chunks at the end of each (source, destination) pair of a dispatch (mirror of
    kTailChunks in intranode.cuh): enough for a last wave of 16 sending blocks."""
    return max(2, -(-16 // (num_ranks - 1)))


def dispatch_chunk_ranges(rows: int, chunk_rows: int, num_ranks: int) -> list[tuple[int, int]]:
    """Row ranges of the chunks (one arrival flag per sending warp each) of a dispatch of
    ``rows`` rows from one rank to another (mirror of ChunkPlan in intranode.cuh): chunks of
    chunk_rows, the last rows in dispatch_tail_chunks(num_ranks) chunks of chunk_rows // 4."""
    small = max(chunk_rows // 4, 1)
    n_small = min(rows, dispatch_tail_chunks(num_ranks) * small)
    n_big = rows - n_small
    out = [(b, min(b + chunk_rows, n_big)) for b in range(0, n_big, chunk_rows)]
    return out + [(b, min(b + small, rows)) for b in range(n_big, rows, small)]


def dispatch_chunk_rows(config_chunk_rows: int, capacity_rows: int, num_ranks: int) -> int:
    """Rows per (big) chunk of a dispatch: the config's, or more where a staging region of
    ``capacity_rows`` rows would otherwise need more than MAX_CHUNKS chunk flags."""
    return max(config_chunk_rows, -(-capacity_rows // (MAX_CHUNKS - dispatch_tail_chunks(num_ranks))))


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


# Staging rows start on 128-byte lines: a row stride that is only 16-byte aligned makes every
# 512-byte warp store of a row touch five lines instead of four, two of them partial writes
# over NVLink.
ROW_ALIGN = 128


def dispatch_row_bytes(hidden: int, fp8: bool, num_topk: int) -> int:
    """Staging row stride of a dispatch (mirror of DispatchRow in intranode.cuh)."""
    payload = hidden * (1 if fp8 else 2)
    groups = hidden // 128 if fp8 else 0
    return _align(payload + 4 * groups + 4 + 8 * num_topk, ROW_ALIGN)


def combine_row_bytes(hidden: int, num_topk: int) -> int:
    return _align(hidden * 2 + 4 * num_topk, ROW_ALIGN)


def max_row_bytes(hidden: int, num_topk: int) -> int:
    """Largest row any operation of this hidden size writes (capacity checks use it)."""
    return max(dispatch_row_bytes(hidden, False, num_topk), dispatch_row_bytes(hidden, True, num_topk)
               if hidden % 128 == 0 else 0, combine_row_bytes(hidden, num_topk))


@dataclass(frozen=True)
class BufferLayout:
    """Byte offsets inside each rank's NVLink buffer (identical on every rank)."""

    num_ranks: int
    ack_off: int
    mailbox_tag_off: int
    mailbox_off: int
    mask_off: int
    flags_off: int
    staging_off: int
    region_bytes: int
    total_bytes: int

    @staticmethod
    def header_bytes(num_ranks: int) -> int:
        R = num_ranks
        return _align(_align(R * 8 * 2 + R * MAILBOX_INTS * 4 + R * 4, 64) + R * MAX_CHUNKS * CHUNK_FLAG_SLOTS * 8,
                      4096)

    @classmethod
    def for_bytes(cls, num_ranks: int, num_nvl_bytes: int) -> "BufferLayout":
        R = num_ranks
        ack = 0
        mtag = ack + R * 8
        mbox = mtag + R * 8
        mask = mbox + R * MAILBOX_INTS * 4  # int [R]: the rank mask (shrink mode), zeroed with the header
        flags = _align(mask + R * 4, 64)
        staging = _align(flags + R * MAX_CHUNKS * CHUNK_FLAG_SLOTS * 8, 4096)
        region = (num_nvl_bytes - staging) // R // 4096 * 4096
        if region <= 0:
            raise ValueError(f"num_nvl_bytes={num_nvl_bytes} is too small for {R} ranks: the control "
                             f"header alone takes {staging} bytes; use get_nvl_buffer_size_hint()")
        return cls(R, ack, mtag, mbox, mask, flags, staging, region, staging + R * region)

    def capacity_rows(self, row_bytes: int) -> int:
        return self.region_bytes // row_bytes


def nvl_buffer_size_hint(hidden: int, num_ranks: int, num_max_tokens_per_rank: int, num_topk: int = 8) -> int:
    """Bytes of NVLink buffer per rank so that up to ``num_max_tokens_per_rank`` tokens of
    ``hidden`` channels and ``num_topk`` experts can be dispatched and combined (worst case:
    every token of every rank goes to every rank)."""
    row = max_row_bytes(hidden, num_topk)
    region = _align(num_max_tokens_per_rank * row, 4096)
    return BufferLayout.header_bytes(num_ranks) + num_ranks * region


# ---- launchers (``mod``: the loaded module of an IntranodeDispatchSpec / IntranodeCombineSpec) ----
def launch_notify(mod, stream: int, p: IntraParams, num_ranks: int, cached: bool) -> None:
    """The count exchange: one block per peer plus the scan block, co-resident (cooperative);
    a cached dispatch only resets its tags (one block)."""
    launch(mod.fn("notify"), 1 if cached else num_ranks + 1, NOTIFY_THREADS, stream, p, cooperative=not cached)


def launch_send(mod, stream: int, p: IntraParams, blocks: int) -> None:
    launch(mod.fn("send"), blocks, THREADS, stream, p)


def launch_recv(mod, stream: int, p: IntraParams, blocks: int) -> None:
    launch(mod.fn("recv"), blocks, THREADS, stream, p)


def launch_combine(mod, stream: int, p: IntraParams, blocks: int) -> None:
    """Sending and receiving blocks of one cooperative grid (``p.num_send_blocks`` send)."""
    launch(mod.fn("combine"), blocks, THREADS, stream, p, cooperative=True)


def launch_compact_scales(mod, stream: int, src: int, dst: int, src_ld: int, rows: int, groups: int,
                          num_sms: int) -> None:
    """Copy the first ``rows`` columns of float32 [groups, src_ld] at ``src`` into [groups, rows] at
    ``dst`` (nothing for 0 rows)."""
    if not rows:
        return
    cp = CompactScalesParams(src, dst, src_ld, rows, groups, 0)
    grid = min(-(-(groups * rows) // COMPACT_THREADS), 4 * num_sms)
    launch(mod.fn("compact_scales"), grid, COMPACT_THREADS, stream, cp)
