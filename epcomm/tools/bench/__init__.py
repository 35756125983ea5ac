"""``epcomm bench normal|low-latency|all``: timings in DeepEP's accounting, baselines measured in
the same run, every output checked against the reference, and the bars of the performance issues
evaluated on the results.

Method: random data (never zeros), random routing, warm-up, then per iteration: device sync,
a start barrier that lets every GPU leave at the same wall time (:class:`_Aligner`), CUDA events
around one call on the caller's stream; per rank the median of the iterations.  The JSON keeps
every rank's medians; the table shows the mean over ranks and the per-rank minimum and maximum
(the bars hold for every rank).

GB/s, DeepEP's accounting (README "Performance"; the project guide ../shared/GUIDE.md, section 5):
* normal dispatch: bytes of all received rows (the rank's own included) / time; a BF16 row is 2H
  bytes, an FP8 row H + 4H/128 (data plus scales, no top-k): :func:`normal_row_bytes`;
* normal combine: bytes of the rows sent back (= the dispatch's received rows, BF16) / time;
* low-latency: selections this rank sends ((token, expert) pairs) x bytes per selection / time,
  H + 4H/128 + 16 for the FP8 dispatch and 2H for the BF16 combine: :func:`ll_row_bytes`.

Baselines, same run: NCCL ``all_to_all_single`` of the same payload (uneven splits from this run's
routing, the same row bytes, the same GB/s accounting: ``nccl_dispatch_*``, ``nccl_combine_*``),
the even split of N x H bf16 kept for comparison with older runs and the guide's section 3
(``nccl_even_a2a_*``), and the copy engine's peer bandwidth.

Checks, after the timings (never inside a timed loop): every rank gathers all ranks' inputs once
and compares its outputs bit for bit with epcomm.reference (:class:`_NormalCheck`,
:class:`_LLCheck`); ``ranks[i]["check"][op]`` is "ok" or a short description of the first
difference.  A failed check is recorded and printed, never raised.

Robustness: each mode runs in its own spawn, and the JSON (and the table) are written after each
mode; a mode that fails is recorded as ``{"error": ...}`` with what its ranks had measured
before the failure (each rank saves its results after every section, :class:`_Progress`).
``bars`` holds the bars of issues 3 and 4 evaluated on the results (:func:`compute_bars`).
Requires torch (CUDA events, NCCL).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from epcomm import envs, interop
from epcomm.tools import spawn
from epcomm.runtime.nvshmem import default_symmetric_size
from epcomm.testing import bit_mismatch

DEFAULT_SMS = (8, 12, 16, 24, 32)
FP8_GROUP = 128


# --------------------------------------------------------------------------- accounting


def normal_row_bytes(hidden: int) -> dict:
    """Bytes per received row in DeepEP's normal-mode accounting: BF16 2H; FP8 H + 4H/128 (data
    plus one float32 scale per 128 channels; top-k entries are not counted)."""
    return {"bf16": 2 * hidden, "fp8": hidden + hidden // FP8_GROUP * 4}


def ll_row_bytes(hidden: int) -> dict:
    """Bytes per selection in the low-latency accounting (the guide, section 5): FP8 dispatch
    H + 4H/128 + 16, BF16 combine 2H."""
    return {"dispatch": hidden + hidden // FP8_GROUP * 4 + 16, "combine": 2 * hidden}


def gbps(nbytes: float, us: float) -> float:
    """GB/s (1e9 bytes per second) of ``nbytes`` moved in ``us`` microseconds; NaN without a time."""
    if us is None or not us > 0 or math.isnan(us):
        return float("nan")
    return nbytes / us / 1e3


# --------------------------------------------------------------------------- DeepEP's size hints


def _align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def deepep_ll_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                             num_experts: int) -> int:
    """DeepEP's ``Buffer.get_low_latency_rdma_size_hint`` for the same shape, recomputed from its
    formula (deepseek-ai/DeepEP, ``LowLatencyLayout`` and ``get_low_latency_rdma_size_hint`` in
    csrc/config.hpp, csrc/legacy/config.hpp since EPv2; this is the form since commit c5facf5,
    2025-08, "Support 10-bit LogFMT Combine", whose combine message carries a bf16x2 min/max per
    128 channels): two send buffers of max(T x dispatch message, E x T x combine message), two
    receive buffers of E x T x the larger message, two signalling buffers of E ints (aligned to
    128), the total rounded up past the next multiple of 128 (NUM_BUFFER_ALIGNMENT_BYTES).
    Dispatch message: 16 + max(2H, H + 4H/128); combine message: 4H/128 + 2H.
    1908.4 MB at T=128, H=7168, 256 experts (issue 4's figure); the rank count does not enter."""
    T, H, E = num_max_dispatch_tokens_per_rank, hidden, num_experts
    scales = H // 128
    disp_msg = 16 + max(2 * H, H + 4 * scales)
    comb_msg = 4 * scales + 2 * H
    send = max(T * disp_msg, E * T * comb_msg)
    recv = max(E * T * disp_msg, E * T * comb_msg)
    signal = _align_up(E * 4, 128)
    total = 2 * send + 2 * recv + 2 * signal
    return (total + 128) // 128 * 128


def deepep_nvl_buffer_size_hint(hidden: int, num_ranks: int, num_sms: int = 20, recv_tokens: int = 256) -> int:
    """DeepEP's ``Config.get_nvl_buffer_size_hint`` for BF16 rows within one node (num_ranks <= 8),
    with its defaults (``Buffer.num_sms`` = 20, ``num_max_nvl_chunked_recv_tokens`` = 256 in the
    default dispatch and combine configs for 2, 4 and 8 ranks; deep_ep/buffer.py and
    csrc/config.hpp): per channel (num_sms / 2) and rank, control ints plus recv_tokens x (row +
    8-byte source meta + 128 int64 top-k + 128 float weights + 128 float scales), rounded up to
    128.  About 336 MB at R=8, H=7168 (issue 3's figure)."""
    ch = num_sms // 2
    n = num_ranks
    b = ch * n * (2 * 1 + 3) * 4
    b += ch * n * recv_tokens * (2 * hidden + 8 + 128 * 8 + 128 * 4 + 128 * 4)
    return _align_up(b, 128)


def heap_breakdown(T: int, H: int, E: int, R: int) -> dict:
    """The regions of epcomm's low-latency symmetric heap (``HeapLayout.make``), in bytes."""
    from epcomm.kernels.low_latency import HeapLayout
    lay = HeapLayout.make(T, H, E, R)
    return {
        "control_words": lay.disp_region_off,
        "dispatch_receive (2 slots x R x T messages)": lay.comb_w_off - lay.disp_region_off,
        "combine_weights (2 x R x T x 32 floats)": lay.comb_region_off - lay.comb_w_off,
        "combine_receive (2 x T x 32 rows of 2H)": lay.disp_send_off - lay.comb_region_off,
        "dispatch_send (2 x T messages)": lay.comb_send_off - lay.disp_send_off,
        "combine_send (2 x E x T rows of 2H)": lay.total - lay.comb_send_off,
        "total": lay.total,
        "message_bytes": lay.msg_bytes,
    }


def _parse_size(text: str) -> int | None:
    """NVSHMEM's size syntax (bytes, or a k/m/g/t suffix, powers of 1024); None if unreadable."""
    t = (text or "").strip().lower().rstrip("b")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(t) if t else None
    except ValueError:
        return None


# --------------------------------------------------------------------------- the issues' bars

# Issue 3 (normal mode): by GPU count, (label, most SMs, {op: GB/s}).  GB/s per rank in DeepEP's
# accounting; each bar holds per rank, so a bar's value is the best, over the SM counts within its
# limit, of the slowest rank's GB/s.
NORMAL_BARS = {
    2: (("at most 24 SMs: 1.3x DeepEP V1", 24, {"dispatch_bf16": 450.0, "dispatch_fp8": 330.0, "combine": 400.0}),
        ("at most 12 SMs: DeepEP V1's 24-SM figures", 12,
         {"dispatch_bf16": 340.0, "dispatch_fp8": 247.0, "combine": 293.0}),
        ("stretch, at most 24 SMs: 1.5x DeepEP V1", 24,
         {"dispatch_bf16": 510.0, "dispatch_fp8": 370.0, "combine": 440.0})),
    4: (("at most 24 SMs: 1.3x DeepEP V1", 24, {"dispatch_bf16": 340.0, "dispatch_fp8": 330.0, "combine": 465.0}),),
}
# Which fields are held against each op's bar, and what each one times.  The issue does not name
# the operation; DeepEP's figures that the bars scale come from its tuning loop, which times the
# cached dispatch (a handle: no count exchange, no CPU synchronisation), while epcomm's full
# dispatch includes both.  So every dispatch bar is reported for both, labelled.
BAR_FIELDS = {
    "dispatch_bf16": (("dispatch_bf16_GBps", "full dispatch: layout given, count exchange, CPU sync, receive; top-k"),
                      ("cached_dispatch_bf16_GBps", "cached dispatch: a handle, no count exchange or CPU sync "
                                                    "(the operation DeepEP's published figures time)")),
    "dispatch_fp8": (("dispatch_fp8_GBps", "full dispatch, row-major scales"),
                     ("dispatch_fp8_colmajor_GBps", "full dispatch, column-major scales"),
                     ("cached_dispatch_fp8_GBps", "cached dispatch, row-major scales")),
    "combine": (("combine_GBps", "combine, BF16, unweighted"),),
}
NORMAL_SETTING = {"tokens": 4096, "hidden": 7168, "topk": 8, "experts": 256}
# Issue 4 (low-latency): graph-replay latency bars by GPU count (us, per rank: the slowest rank's
# median is compared), the stretch bars (2 GPUs), the host bar and the heap bar.
LL_BARS = {2: {"dispatch": 22.0, "combine": 30.0}, 4: {"dispatch": 26.0, "combine": 42.0}}
LL_STRETCH = {2: {"dispatch": 15.0, "combine": 20.0}}
LL_GRAPH_FIELDS = (
    ("_graph_us_back_to_back", "graph replay, 20 queued back to back behind one aligned start, mean per "
                               "replay (combine: dispatch+combine pairs minus dispatch alone)"),
    ("_graph_us", "graph replay, one per aligned start (median)"),
)
HOST_BAR_US = 15.0
LL_SETTING = {"tokens": 128, "hidden": 7168, "topk": 8, "experts": 256}


def _sms_entry(rank: dict, sms) -> dict:
    d = rank.get("sms") or {}
    return d.get(sms) or d.get(str(sms)) or {}


def _sms_counts(entry: dict) -> list[int]:
    ks = set((entry.get("args") or {}).get("sms") or ())
    for r in entry.get("ranks") or ():
        if r:
            ks.update(int(k) for k in (r.get("sms") or {}))
    return sorted(ks)


def _setting_note(args: dict, setting: dict) -> str | None:
    diff = {k: args.get(k) for k, v in setting.items() if args.get(k) != v}
    if diff:
        return f"shape differs from the issue's setting {setting}: {diff}; the bars are informational"
    return None


def _normal_bars(entry: dict, world: int) -> dict:
    ranks = [r for r in entry.get("ranks") or () if r]
    out = {"world_size": world,
           "rule": "per-rank GB/s; value = max over SM counts <= max_sms of the minimum over ranks",
           "entries": []}
    note = _setting_note(entry.get("args") or {}, NORMAL_SETTING)
    if note:
        out["note"] = note
    bars = NORMAL_BARS.get(world)
    if not bars:
        out["note"] = f"issue 3 sets bars for 2 and 4 GPUs; this run has {world}"
        return out
    sms_counts = _sms_counts(entry)
    for label, max_sms, thresholds in bars:
        for op, thr in thresholds.items():
            for field, timing in BAR_FIELDS[op]:
                best = None
                for s in sms_counts:
                    if s > max_sms:
                        continue
                    vals = [_sms_entry(r, s).get(field) for r in ranks]
                    if not _complete(vals, world):
                        continue
                    if best is None or min(vals) > best[0]:
                        best = (min(vals), s, vals)
                e = {"bar": label, "op": op, "field": field, "timing": timing, "max_sms": max_sms,
                     "threshold_GBps": thr}
                if best is None:
                    e.update({"value_GBps": None, "pass": None,
                              "note": f"not measured on all {world} ranks at <= {max_sms} SMs"})
                else:
                    e.update({"value_GBps": best[0], "at_sms": best[1], "per_rank_GBps": best[2],
                              "pass": best[0] >= thr})
                out["entries"].append(e)
    return out


def _complete(vals: list, world: int) -> bool:
    """Whether ``vals`` (one per rank) holds a number, not NaN, for each of the ``world`` ranks."""
    return len(vals) >= world and all(isinstance(v, (int, float)) and not math.isnan(v) for v in vals)


def _ll_value(ranks: list, field: str, world: int):
    """The slowest rank's value of ``field`` (None unless every rank has it)."""
    vals = []
    for r in ranks:
        v = r.get(field)
        if v is None and field == "host_us_per_combine" and "host_us_per_combine_plus_dispatch" in r:
            v = r["host_us_per_combine_plus_dispatch"] - r["host_us_per_dispatch"]  # older files
        if v is None and field == "nvshmem_symmetric_size":
            v = (r.get("heap") or {}).get("nvshmem_symmetric_size")
        vals.append(v)
    if not _complete(vals, world):
        return None, vals
    return max(vals), vals


def _ll_bars(entry: dict, world: int) -> dict:
    ranks = [r for r in entry.get("ranks") or () if r]
    args = entry.get("args") or {}
    out = {"world_size": world, "rule": "per-rank medians; value = the slowest rank's", "entries": []}
    note = _setting_note(args, LL_SETTING)
    if note:
        out["note"] = note

    def add(bar, field, timing, thr, unit):
        v, vals = _ll_value(ranks, field, world)
        e = {"bar": bar, "field": field, "timing": timing, f"threshold_{unit}": thr, f"value_{unit}": v,
             "per_rank": vals, "pass": None if v is None else (v <= thr)}
        if v is None:
            e["note"] = f"not measured on all {world} ranks"
        out["entries"].append(e)

    lat = LL_BARS.get(world)
    if lat is None:
        out["latency_note"] = f"issue 4 sets latency bars for 2 and 4 GPUs; this run has {world}"
    for op in ("dispatch", "combine"):
        for suffix, timing in LL_GRAPH_FIELDS:
            if lat is not None:
                add(f"{op} <= {lat[op]:g} us (graph replay)", op + suffix, timing, lat[op], "us")
            if world in LL_STRETCH:
                thr = LL_STRETCH[world][op]
                add(f"stretch: {op} <= {thr:g} us (graph replay)", op + suffix, timing, thr, "us")
    for op in ("dispatch", "combine"):
        add(f"host time per {op} call, not graph-captured, <= {HOST_BAR_US:g} us", f"host_us_per_{op}",
            "perf_counter over 200 calls, EPCOMM_CHECK_INDICES=0" + (
                "; combine = (combine + dispatch) pairs minus dispatch alone" if op == "combine" else ""),
            HOST_BAR_US, "us")
    if all(k in args for k in ("tokens", "hidden", "experts")):
        hint = deepep_ll_rdma_size_hint(args["tokens"], args["hidden"], world, args["experts"])
        add("symmetric-heap bytes <= DeepEP's size hint (buffer requested)", "rdma_bytes",
            "num_rdma_bytes of the Buffer (epcomm's get_low_latency_rdma_size_hint)", hint, "bytes")
        add("symmetric-heap bytes <= DeepEP's size hint (heap NVSHMEM reserves)", "nvshmem_symmetric_size",
            "NVSHMEM_SYMMETRIC_SIZE seen by the worker (epcomm sets 1.1 x buffer + 256 MiB when unset)", hint,
            "bytes")
    return out


def compute_bars(res: dict) -> dict:
    """Issues 3 and 4's bars evaluated on a result dict (new or older JSON): for each bar the field
    used, what it times, its value (the slowest rank's, see ``rule``), the threshold and pass
    (None when not measured).  Bars are set for 2 and 4 GPUs; other counts get a note (the host
    and heap bars of issue 4 apply to any count)."""
    world = int((res.get("meta") or {}).get("world_size") or 0)
    out = {}
    if isinstance(res.get("normal"), dict):
        out["normal"] = _normal_bars(res["normal"], world)
    if isinstance(res.get("low_latency"), dict):
        out["low_latency"] = _ll_bars(res["low_latency"], world)
    return out


# --------------------------------------------------------------------------- timing helpers


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _commit() -> str:
    c = envs.GIT_COMMIT.get()
    if c:
        return c
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _time_op(torch, fn, iters: int, warmup: int, align, host: list | None = None) -> list[float]:
    """Per-iteration event timings (us) of fn() on the current stream, each started aligned.
    ``host``: a list that receives each timed call's host time (us, perf_counter around fn():
    for a CPU-synchronised dispatch this includes the wait for the GPU's counts)."""
    for _ in range(warmup):
        align()
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        align()
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e) * 1e3)
        if host is not None:
            host.append((t1 - t0) * 1e6)
    return out


def _clock_failed(aligned_per_rank: list[int], barriers: int) -> bool:
    """The 'clock' start barrier is judged failed when some rank saw fewer than half of the first
    ``barriers`` barriers align (each failure costs the barrier's 200 ms cap)."""
    return min(aligned_per_rank) * 2 < barriers


class _Aligner:
    """Start every rank's timed region at the same moment on the GPUs.

    Host barriers leave ranks milliseconds apart, and a collective op then measures the wait
    for the slowest host.  Instead the GPUs wait, on the caller's stream, long enough for every
    host to queue the timed call before the start event is reached (1.5 ms: a normal dispatch's
    Python before its first launch took up to ~350 us on a busy host; what the host does after
    the GPU started, such as the CPU synchronisation inside a dispatch, stays inside the
    timing).  How every GPU knows when to leave is the mode:

    * "clock" (default): epcomm::start_barrier.  Rank 0 measures every GPU's %globaltimer offset
      against its own over peer memory (NTP-style, about 1 us of error over NVLink), picks
      a start 1.5 ms ahead and sends it to every GPU in that GPU's clock.  The clocks of the
      GPUs do not agree (about 0.5 ms apart on 2x H200), so a deadline in one clock cannot be
      shared as is.  Needs CUDA IPC between the ranks (one node).
    * "wall": a 1-element NCCL all-reduce, then a fixed 1.5 ms %globaltimer wait: the GPUs leave
      as unevenly as the all-reduce ended (tens of us apart on 2x H200; the late rank's op then
      measures only its own part, the early rank's also the wait).  Kept to measure that.

    Fallback ("clock" with ``fallback``): the barrier gives up a wait after 200 ms and the call
    goes on unaligned, so a barrier that never aligns would add 200 ms to every timed
    iteration.  After the first :attr:`PROBE_BARRIERS` barriers every rank learns how many
    aligned on each rank (an all-gather over the epcomm group, so all ranks decide alike) and,
    if some rank saw fewer than half align, all switch to "wall" (which needs ``dist``); the
    decision is in :meth:`summary`.  Every rank must call the aligner the same number of times.
    """

    MODES = ("clock", "wall")
    PROBE_BARRIERS = 4

    def __init__(self, torch, dist, group=None, sleep_us: float = 1500.0, mode: str = "clock",
                 fallback: bool = True):
        if mode not in self.MODES:
            raise ValueError(f"aligner mode {mode!r}: expected one of {self.MODES}")
        if mode == "clock" and group is None:
            raise ValueError("aligner mode 'clock' needs the epcomm group (CUDA IPC handles are exchanged)")
        from epcomm.jit import loader
        from epcomm.jit.launch import launch
        from epcomm.kernels import timing as K
        self.torch, self.dist, self.group, self.mode, self.requested = torch, dist, group, mode, mode
        self._launch = launch
        self._sleep_us = sleep_us
        self._mod = loader.load(K.SpinWaitSpec(), torch.cuda.current_device())
        self.fallback: dict | None = None
        self.reports: list[tuple[int, int, int]] = []
        self.opened: list = []
        self.chan = 0
        self._probe = 0
        if mode == "wall":
            self._use_wall()
            return
        from epcomm.runtime import driver
        self._cuda = driver
        self._fn, self._threads = self._mod.fn("start_barrier"), K.ALIGN_THREADS
        self.chan = driver.mem_alloc(K.ALIGN_CHANNEL_BYTES)
        driver.memset_d8_async(self.chan, 0, K.ALIGN_CHANNEL_BYTES, torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        handles = group.allgather_bytes(driver.ipc_get_handle(self.chan))
        p = K.AlignParams()
        for r, h in enumerate(handles):
            if r == group.rank:
                p.chan[r] = self.chan
            else:
                p.chan[r] = driver.ipc_open(h)
                self.opened.append(p.chan[r])
        self.report = torch.zeros(3, dtype=torch.int64, device="cuda")
        p.lead_ns, p.cap_ns = int(sleep_us * 1e3), 200_000_000
        p.report = self.report.data_ptr()
        p.rank, p.num_ranks = group.rank, group.size
        self._p = p
        self._probe = self.PROBE_BARRIERS if fallback else 0
        group.barrier()  # every channel zeroed before anyone pings

    def _use_wall(self) -> None:
        from epcomm.kernels import timing as K
        self.mode = "wall"
        self.t = self.torch.zeros(1, device="cuda")
        self._fn, self._threads = self._mod.fn("spin_wait_ns"), K.SpinWaitSpec().threads
        self._p = K.SpinParams()
        self._p.ns = int(self._sleep_us * 1e3)

    def _judge(self) -> None:
        n = len(self.reports)
        mine = sum(r[2] for r in self.reports)
        counts = [int(b.decode()) for b in self.group.allgather_bytes(str(mine).encode())]
        if not _clock_failed(counts, n):
            return
        self.fallback = {"after_barriers": n, "aligned_per_rank": counts}
        if self.dist is None:
            self.fallback["switched_to"] = None
            self.fallback["why_not"] = "no NCCL group for the 'wall' aligner"
            return
        self.fallback["switched_to"] = "wall"
        self._use_wall()

    def __call__(self):
        torch = self.torch
        torch.cuda.synchronize()
        if self.mode == "clock":
            if self._p.seq:
                self.reports.append(tuple(int(v) for v in self.report.tolist()))
            if self._probe and len(self.reports) >= self._probe:
                self._probe = 0
                self._judge()
        stream = torch.cuda.current_stream().cuda_stream
        if self.mode == "wall":
            self.dist.all_reduce(self.t)
        else:
            self._p.seq += 1
        self._launch(self._fn, 1, self._threads, stream, self._p)

    def summary(self) -> dict:
        """The mode used (and a fallback from 'clock'); for 'clock' barriers: this GPU's clock
        offset vs rank 0's, best round trip and how many barriers aligned."""
        out: dict = {"mode": self.mode}
        if self.requested != self.mode:
            out["requested"] = self.requested
        if self.fallback:
            out["fallback"] = self.fallback
        if self.reports:
            offs = [r[0] for r in self.reports if r[2]]
            rtts = [r[1] for r in self.reports if r[2]]
            out.update({"barriers": len(self.reports), "aligned": sum(r[2] for r in self.reports),
                        "clock_offset_us_vs_rank0": _median(offs) / 1e3 if offs else None,
                        "clock_offset_spread_us": (max(offs) - min(offs)) / 1e3 if offs else None,
                        "round_trip_us": _median(rtts) / 1e3 if rtts else None})
        return out

    def close(self) -> None:
        if self.chan:
            self.torch.cuda.synchronize()
            for ptr in self.opened:
                self._cuda.ipc_close(ptr)
            self._cuda.mem_free(self.chan)
            self.opened, self.chan = [], 0


def _nccl_init(torch, rank, world, group):
    import tempfile

    import torch.distributed as dist
    path = group.broadcast_bytes(tempfile.mktemp(prefix="epcomm-nccl-").encode() if rank == 0 else None).decode()
    dist.init_process_group("nccl", init_method=f"file://{path}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))
    return dist


def _nccl_even_a2a(torch, dist, numel: int, iters: int, align) -> float:
    """all_to_all_single of ``numel`` bf16 split evenly over the ranks (older runs' baseline)."""
    x = torch.randn(numel, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    return _median(_time_op(torch, lambda: dist.all_to_all_single(y, x), iters, 5, align))


def _nccl_a2a_rows(torch, dist, send: list[int], recv: list[int], row_bytes: int, iters: int, align) -> float:
    """all_to_all_single of rows of ``row_bytes`` bytes: ``send[d]`` rows to rank d, ``recv[s]``
    from rank s (the splits of an epcomm operation, so the same payload)."""
    i = torch.randint(0, 256, (sum(send), row_bytes), dtype=torch.uint8, device="cuda")
    o = torch.empty((sum(recv), row_bytes), dtype=torch.uint8, device="cuda")
    return _median(_time_op(torch, lambda: dist.all_to_all_single(o, i, recv, send), iters, 5, align))


def _peer_copy(torch, rank, world, group, nbytes: int, iters: int, align) -> dict:
    """Copy-engine bandwidth into the next rank's memory (CUDA IPC), alone and all at once."""
    from epcomm.runtime import driver
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst_local = driver.mem_alloc(nbytes)
    hs = group.allgather_bytes(driver.ipc_get_handle(dst_local))
    peer = driver.ipc_open(hs[(rank + 1) % world])
    stream = torch.cuda.current_stream().cuda_stream
    res = {}

    def copy():
        driver.memcpy_dtod_async(peer, src.data_ptr(), nbytes, stream)

    # Alone: only rank 0 copies, the others wait at the barrier.
    ts = []
    for _ in range(iters):
        torch.cuda.synchronize()
        group.barrier()
        if rank == 0:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); copy(); e.record(); e.synchronize()
            ts.append(s.elapsed_time(e) * 1e3)
        group.barrier()
    if rank == 0:
        res["unidirectional_GBps"] = nbytes / (_median(ts) * 1e-6) / 1e9
    # Everyone at once (each GPU sends and receives).
    ts = _time_op(torch, copy, iters, 2, align)
    res["all_ranks_at_once_GBps_per_gpu"] = nbytes / (_median(ts) * 1e-6) / 1e9
    torch.cuda.synchronize()
    group.barrier()
    driver.ipc_close(peer)
    driver.mem_free(dst_local)
    return res


def _env_seen() -> dict:
    """The EPCOMM_*, NVSHMEM_* and NCCL_* variables this process sees: recorded with the results,
    since they change what runs (a dump for the record, not a setting read: epcomm reads its own
    through epcomm.envs)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(("EPCOMM_", "NVSHMEM_", "NCCL_"))}


def _worker_setup(rank, world, group, aligner: str = "clock"):
    """Device, no host index checks (they sync the device on every call), NCCL for the baselines
    and the aligner (``aligner``: its mode, see :class:`_Aligner`)."""
    import torch
    torch.cuda.set_device(rank)
    os.environ["EPCOMM_CHECK_INDICES"] = "0"
    torch.manual_seed(1234 + rank)  # every rank's data differs, and a failed check can be replayed
    spawn.phase("setup")
    dist = _nccl_init(torch, rank, world, group)
    return torch, dist, _Aligner(torch, dist, group, mode=aligner)


class _Progress:
    """:func:`spawn.phase` plus a copy of this rank's results so far, saved before every new
    section into ``args["partial_dir"]`` (when given), where the parent finds them if the spawn
    fails: a hang or an error then loses only the section it happened in."""

    def __init__(self, args: dict, mode: str, rank: int, out: dict):
        d = args.get("partial_dir")
        self.path = os.path.join(d, f"{mode}.{rank}.json") if d else None
        self.out = out

    def __call__(self, name: str) -> None:
        self.save()
        spawn.phase(name)

    def save(self) -> None:
        if self.path is not None:
            write_json(self.out, self.path)


# --------------------------------------------------------------------------- checks


_INT_OF_WIDTH = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def _diff(name: str, got, exp) -> list[str]:
    """[] if ``got`` equals ``exp`` bit for bit (integer arrays of different widths: by value),
    else one line: how many elements differ and the first.  Two torch tensors are compared on
    their device; otherwise on the host (a torch ``got`` is copied)."""
    if not isinstance(got, np.ndarray) and not isinstance(exp, np.ndarray):  # both torch
        import torch
        if tuple(got.shape) != tuple(exp.shape):
            return [f"{name}: shape {tuple(got.shape)}, expected {tuple(exp.shape)}"]
        if got.element_size() != exp.element_size():
            return [f"{name}: dtype {got.dtype}, expected {exp.dtype}"]
        it = getattr(torch, _INT_OF_WIDTH[got.element_size()])
        ne = got.contiguous().view(it) != exp.contiguous().view(it)
        n = int(ne.sum())
        if not n:
            return []
        first = tuple(int(v) for v in ne.nonzero()[0].tolist())
        return [f"{name}: {n} of {ne.numel()} elements differ (first at {first})"]
    if not isinstance(got, np.ndarray):
        got = interop.to_numpy(got)
    bad = bit_mismatch(name, got, exp)
    return [bad] if bad else []


def _verdict(problems: list[str]) -> str:
    return "ok" if not problems else "; ".join(problems)[:600]


def _checked(error: str | None, problems, *args) -> str:
    """A check's verdict: ``error`` (the reference could not be computed) if set, else that of
    ``problems(*args)`` (a list of problems), or what it raised: a check never stops the
    benchmark."""
    if error:
        return error
    try:
        return _verdict(problems(*args))
    except Exception as e:  # noqa: BLE001
        return f"check raised {type(e).__name__}: {e}"


def _record_check(checks: dict, op: str, verdict: str, where: str = "") -> None:
    """Keep "ok" or the first failure of ``op`` (``where``: e.g. the SM count)."""
    if verdict == "ok":
        checks.setdefault(op, "ok")
    elif checks.get(op, "ok") == "ok":
        checks[op] = f"{where}: {verdict}" if where else verdict


def _gatherer(torch, dist):
    def gather(name, t):
        """Every rank's ``t`` stacked in rank order (one NCCL all-gather)."""
        t = t.contiguous()
        out = torch.empty((dist.get_world_size(), *t.shape), dtype=t.dtype, device=t.device)
        dist.all_gather_into_tensor(out, t)
        return out
    return gather


class _NormalCheck:
    """This rank's expected normal-mode outputs, from every rank's inputs (gathered once with
    ``gather(name, tensor)`` -> [R, ...], before the timings).

    The contract is epcomm.reference's: on each destination, rows ordered by source rank, then
    source token, data and scales copied bit for bit; combine = bf16 of the fp32 sum over the
    destination ranks.  epcomm.reference.dispatch and .combine run on every rank's routing and
    on 64 sampled columns of the data: they give the source indices, rank prefix, top-k indices
    and weights, per-expert counts, those columns of the rows and of the combine.  The full
    width of every row is then compared on the device with the gathered inputs at the
    reference's source indices.  The combine's input is the received rows times 2**rank (exact
    in bf16), so its exact result is bf16(x * sum of 2**d over the destinations d of the
    token): each destination's rows show, and the fp32 sum has at most 16 significant bits, so
    it is exact in any order and its full width is checked on the device too.

    ``error`` is set (and every check returns it) if the reference could not be computed.
    """

    def __init__(self, torch, gather, rank: int, world: int, x, xq, xs, topk, w, num_experts: int):
        self.torch, self.rank = torch, rank
        # The collectives first, alike on every rank whatever happens below.
        x_all = gather("x", x)
        xq_all = gather("xq", xq.view(torch.uint8))
        xs_all = gather("xs", xs)
        topk_all = gather("topk", topk).cpu().numpy()
        w_all = gather("w", w).cpu().numpy()
        self.error = None
        try:
            self._prepare(x, x_all, xq_all, xs_all, topk_all, w_all, world, num_experts)
        except Exception as e:  # noqa: BLE001 - recorded as every check's verdict
            self.error = f"reference not computed: {type(e).__name__}: {e}"

    def _prepare(self, x, x_all, xq_all, xs_all, topk_all, w_all, R, E):
        from epcomm import reference
        torch = self.torch
        _, N, H = x_all.shape
        dev = x.device
        self.cols = torch.arange(0, H, max(1, H // 64), device=dev)
        xsl = [interop.to_numpy(x_all[r][:, self.cols]) for r in range(R)]
        refs = reference.dispatch(xsl, E, topk_idx=[topk_all[r] for r in range(R)],
                                  topk_weights=[w_all[r] for r in range(R)])
        me = self.me = refs[self.rank]
        ys = [(r.recv_x.astype(np.float32) * np.float32(2.0 ** d)).astype(reference.BF16) for d, r in enumerate(refs)]
        self.comb_cols = reference.combine(ys, [r.handle for r in refs])[self.rank][0]
        prefix = me.handle.rank_prefix.astype(np.int64)
        src = np.repeat(np.arange(R, dtype=np.int64), np.diff(prefix)) * N + me.handle.recv_src_idx.astype(np.int64)
        gidx = torch.from_numpy(src).to(dev)
        self.x_rows = x_all.reshape(R * N, H)[gidx]
        self.xq_rows = xq_all.reshape(R * N, H)[gidx]
        self.xs_rows = xs_all.reshape(R * N, -1)[gidx]
        coef = (me.handle.is_token_in_rank.astype(np.float32) * (2.0 ** np.arange(R, dtype=np.float32))).sum(1)
        self.comb_full = (x.float() * torch.from_numpy(coef).to(dev)[:, None]).to(torch.bfloat16)

    def combine_input(self, recv_x):
        """The combine's input made from a BF16 dispatch's rows: times 2**rank (exact)."""
        return (recv_x.float() * float(2 ** self.rank)).to(self.torch.bfloat16)

    def dispatch(self, result, fp8: bool, meta: bool) -> str:
        """``result``: a dispatch's return tuple.  ``meta``: also the handle, top-k and counts
        (a full dispatch's; a cached dispatch returns none of them)."""
        return _checked(self.error, self._dispatch, result, fp8, meta)

    def _dispatch(self, result, fp8, meta):
        torch = self.torch
        recv_x, rti, rtw, counts, h, _ = result
        data, scales = recv_x if fp8 else (recv_x, None)
        me = self.me
        M = int(me.handle.num_recv_tokens)
        if data.shape[0] != M:
            return [f"{data.shape[0]} rows received, the reference has {M}"]
        p = []
        if fp8:
            p += _diff("recv_x (e4m3 bytes)", data.view(torch.uint8), self.xq_rows)
            p += _diff("recv_x_scales", scales, self.xs_rows)
        else:
            p += _diff("recv_x", data, self.x_rows)
            p += _diff("recv_x sampled columns vs reference.dispatch", data[:, self.cols], me.recv_x)
        if meta:
            p += _diff("recv_src_idx", h.recv_src_idx, me.handle.recv_src_idx)
            p += _diff("rank_prefix", h.rank_prefix, me.handle.rank_prefix)
            want = tuple(int(v) for v in np.diff(me.handle.rank_prefix.astype(np.int64)))
            if tuple(h.recv_counts or ()) != want:
                p.append(f"recv_counts {tuple(h.recv_counts or ())}, expected {want}")
            p += _diff("recv_topk_idx", rti, me.recv_topk_idx)
            p += _diff("recv_topk_weights", rtw, me.recv_topk_weights)
            if list(counts) != list(me.num_recv_tokens_per_expert_list):
                p.append("num_recv_tokens_per_expert_list differs from the reference")
        return p

    def combine(self, combined) -> str:
        """``combined``: the combine's output for the input :meth:`combine_input` made."""
        return _checked(self.error, lambda: _diff("combined_x", combined, self.comb_full)
                        + _diff("combined_x sampled columns vs reference.combine", combined[:, self.cols],
                                self.comb_cols))


class _LLCheck:
    """This rank's expected low-latency outputs (epcomm.reference.low_latency_dispatch with FP8,
    and low_latency_combine), from every rank's inputs gathered once before the timings.

    The combine's input is built from the expected dispatch output: expert j of rank d returns
    bf16(dequantised row x (d + 1.5) x (1 + j / 64)), so every expert's rows differ and the order
    of the combine's additions shows; rows past recv_count are zeros (the combine never reads
    them).  :attr:`y` is this rank's input (None if the reference could not be computed: every
    check then returns :attr:`error`).  The expected combine is computed with the partial sums
    as the buffer sends them (``partials``, see reference.low_latency_combine) and the other way
    (the benchmark's A/B of the two combine formats)."""

    def __init__(self, torch, gather, rank: int, world: int, x, topk, w, T: int, E: int, partials: bool):
        self.torch, self.rank, self.partials = torch, rank, bool(partials)
        x_all = gather("x", x)
        topk_all = gather("topk", topk).cpu().numpy()
        w_all = gather("w", w).cpu().numpy()
        self.y = None
        self.error = None
        try:
            self._prepare(x, x_all, topk_all, w_all, world, T, E)
        except Exception as e:  # noqa: BLE001
            self.error = f"reference not computed: {type(e).__name__}: {e}"

    def _prepare(self, x, x_all, topk_all, w_all, R, T, E):
        from epcomm import reference
        torch = self.torch
        xs = [interop.to_numpy(x_all[r]) for r in range(R)]
        tks = [topk_all[r] for r in range(R)]
        ws = [w_all[r] for r in range(R)]
        ref = reference.low_latency_dispatch(xs, tks, T, E, use_fp8=True)
        ys = []
        for d, r in enumerate(ref):
            y = np.zeros(r.recv_x.shape, dtype=reference.BF16)
            m = np.arange(R * T)[None, :] < r.recv_count[:, None]
            j = np.nonzero(m)[0].astype(np.float32)
            rows = r.recv_x[m].astype(np.float32) * np.repeat(r.recv_x_scales[m], reference.FP8_GROUP, axis=1)
            y[m] = (rows * np.float32(d + 1.5) * (1 + j / 64)[:, None]).astype(reference.BF16)
            ys.append(y)
        handles = [r.handle for r in ref]
        self.expected = {p: reference.low_latency_combine(ys, tks, ws, handles, partials=p)[self.rank]
                         for p in (False, True)}
        me = self.me = ref[self.rank]
        self.mask_np = np.arange(R * T)[None, :] < me.recv_count[:, None]
        self.mask = torch.from_numpy(self.mask_np).to(x.device)
        self.y = interop.from_numpy("torch", ys[self.rank], x.device.type, x.device.index or 0)

    def dispatch(self, recv_x, recv_count, handle) -> str:
        """An FP8 dispatch's ``(data, scales)``, counts and handle, against the reference: the
        rows below each expert's count (bytes, scales, source token), the counts and ranges."""
        return _checked(self.error, self._dispatch, recv_x, recv_count, handle)

    def _dispatch(self, recv_x, recv_count, handle) -> list[str]:
        torch, me, m, mn = self.torch, self.me, self.mask, self.mask_np
        data, scales = recv_x
        p = _diff("recv_count", recv_count, me.recv_count)
        if not p:
            p += _diff("recv_x rows (e4m3 bytes)", data.view(torch.uint8)[m], me.recv_x[mn])
            p += _diff("recv_x_scales rows", scales[m], me.recv_x_scales[mn])
            p += _diff("src_info rows", handle.src_info[m], me.handle.src_info[mn])
            p += _diff("layout_range", handle.layout_range, me.handle.layout_range)
        return p

    def combine(self, combined, partials: bool | None = None) -> str:
        """A combine's output for input :attr:`y` (``partials``: the setting it ran with;
        default the buffer's)."""
        p = self.partials if partials is None else bool(partials)
        return _checked(self.error, lambda: _diff("combined_x", combined, self.expected[p]))


# --------------------------------------------------------------------------- normal mode


def _normal_worker(rank, world, group, args) -> dict:
    import epcomm
    from epcomm.testing import random_topk
    torch, dist, align = _worker_setup(rank, world, group, args.get("aligner", "clock"))
    N, H, K, E = args["tokens"], args["hidden"], args["topk"], args["experts"]
    iters = args["iters"]
    rb = normal_row_bytes(H)
    nbytes = epcomm.Buffer.get_nvl_buffer_size_hint(H, world, N, K)
    buf = epcomm.Buffer(group, nbytes)
    out = {"rank": rank, "nvl_buffer_bytes": nbytes, "env": _env_seen(), "sms": {}, "check": {}}
    prog = _Progress(args, "normal", rank, out)
    rng = np.random.default_rng(1234 + rank)
    topk = torch.from_numpy(random_topk(rng, N, E, K)).cuda()
    w = torch.rand(N, K, device="cuda")
    x = torch.randn(N, H, device="cuda").to(torch.bfloat16)
    xq = x.float().clamp(-448, 448).to(torch.float8_e4m3fn)
    xs = torch.rand(N, H // 128, device="cuda") + 0.5
    # Column-major scales, as DeepGEMM wants them and recent DeepEP tests pass them (epcomm then
    # skips its speculative receive, buffer.py).
    xs_col = xs.T.contiguous().T
    ntr, _, nte, itr, _ = buf.get_dispatch_layout(topk, E)
    route = dict(num_tokens_per_rank=ntr, is_token_in_rank=itr, num_tokens_per_expert=nte, topk_idx=topk,
                 topk_weights=w)
    prog("reference")
    chk = _NormalCheck(torch, _gatherer(torch, dist), rank, world, x, xq, xs, topk, w, E)
    prog("layout")
    out["layout_us"] = _median(_time_op(torch, lambda: buf.get_dispatch_layout(topk, E), iters, 5, align))
    handle = None
    for sms in args["sms"]:
        res = out["sms"][sms] = {}
        try:
            buf.set_num_sms(sms)
        except (ValueError, TypeError) as e:  # e.g. more SMs than the GPU has: alike on every rank
            res["error"] = f"{type(e).__name__}: {e}"
            continue
        st = {}

        def measure(name, fn, nb):
            prog(f"{name} sms={sms}")
            host: list[float] = []
            try:
                ts = _time_op(torch, fn, iters, 5, align, host)
            except (ValueError, TypeError) as e:  # raised before any launch, alike on every rank
                res[f"{name}_error"] = f"{type(e).__name__}: {e}"
                return
            t = _median(ts)
            res[f"{name}_us"] = t
            # For the rank-to-rank spread of the CPU-synchronised dispatch (whose end waits for
            # the host): the slowest iterations and the host's time per call, in the JSON only.
            res[f"{name}_us_p90"] = float(np.percentile(ts, 90))
            res[f"{name}_host_us"] = _median(host)
            if nb is not None:
                res[f"{name}_GBps"] = gbps(nb, t)

        def disp_bf16():
            st["r"] = buf.dispatch(x, **route)
        measure("dispatch_bf16", disp_bf16, None)
        if "r" not in st or "dispatch_bf16_error" in res:
            continue
        recv_x, _, _, _, handle, _ = st["r"]
        rows = recv_x.shape[0]
        bf16_b, fp8_b = rows * rb["bf16"], rows * rb["fp8"]
        res["recv_rows"] = rows
        res["dispatch_bf16_GBps"] = gbps(bf16_b, res["dispatch_bf16_us"])
        y = chk.combine_input(recv_x)
        # (name, call, bytes, FP8, returns the handle/top-k/counts): timed in this order with the
        # combine after the first two, then checked.
        calls = (("dispatch_fp8", lambda: buf.dispatch((xq, xs), **route), fp8_b, True, True),
                 ("dispatch_fp8_colmajor", lambda: buf.dispatch((xq, xs_col), **route), fp8_b, True, True),
                 ("cached_dispatch_bf16", lambda: buf.dispatch(x, handle=handle), bf16_b, False, False),
                 ("cached_dispatch_fp8", lambda: buf.dispatch((xq, xs), handle=handle), fp8_b, True, False))
        for name, call, nbytes, _, _ in calls[:2]:
            measure(name, call, nbytes)
        measure("combine", lambda: buf.combine(y, handle), bf16_b)
        for name, call, nbytes, _, _ in calls[2:]:
            measure(name, call, nbytes)
        # Checks, untimed: the timed BF16 dispatch's last outputs, then one more call of each
        # other operation (every rank makes the same calls, whatever its comparisons find).
        prog(f"check sms={sms}")
        torch.cuda.synchronize()
        _record_check(out["check"], "dispatch_bf16", chk.dispatch(st["r"], False, True), f"sms={sms}")
        for name, call, _, fp8, meta in calls:
            if f"{name}_error" in res:
                continue
            got = call()
            torch.cuda.synchronize()
            _record_check(out["check"], name, chk.dispatch(got, fp8, meta), f"sms={sms}")
        if "combine_error" not in res:
            got = buf.combine(y, handle)[0]
            torch.cuda.synchronize()
            _record_check(out["check"], "combine", chk.combine(got), f"sms={sms}")
    intra = buf._intra
    out["speculative_outputs"] = {"hits": intra.spec_hits, "misses": intra.spec_misses}
    prog("baselines")
    if handle is not None:
        # Same payload: the dispatch's splits (tokens to each rank, rows from each rank).
        send, recv = [int(v) for v in ntr.tolist()], [int(v) for v in handle.recv_counts]
        rows = sum(recv)
        for name in ("bf16", "fp8"):
            t = _nccl_a2a_rows(torch, dist, send, recv, rb[name], iters, align)
            out[f"nccl_dispatch_{name}_us"], out[f"nccl_dispatch_{name}_GBps"] = t, gbps(rows * rb[name], t)
        t = _nccl_a2a_rows(torch, dist, recv, send, rb["bf16"], iters, align)
        out["nccl_combine_us"], out["nccl_combine_GBps"] = t, gbps(rows * rb["bf16"], t)
    t = _nccl_even_a2a(torch, dist, N * H, iters, align)
    out["nccl_even_a2a_us"] = t
    out["nccl_even_a2a_offrank_GBps"] = gbps(N * H * 2 * (world - 1) / world, t)
    prog("peer copy")
    out["peer_copy"] = _peer_copy(torch, rank, world, group, 1 << 30, 10, align)
    out["aligner"] = align.summary()
    prog.save()
    align.close()
    dist.destroy_process_group()
    buf.destroy()
    return out


# --------------------------------------------------------------------------- low-latency mode


def _heap_report(T: int, H: int, E: int, world: int, nbytes: int) -> dict:
    raw = envs.external("NVSHMEM_SYMMETRIC_SIZE")
    return {"rdma_bytes": nbytes, "nvshmem_symmetric_size_text": raw,
            "nvshmem_symmetric_size": _parse_size(raw),
            "epcomm_default_symmetric_size": default_symmetric_size(nbytes),
            "layout": heap_breakdown(T, H, E, world),
            "deepep_rdma_size_hint": deepep_ll_rdma_size_hint(T, H, world, E)}


def _ll_grids(buf, T: int, E: int, world: int) -> dict:
    """Blocks of the low-latency kernels (one per SM while blocks <= SMs; the guide asks for the
    SM count with every result): the one-kernel calls' grids from the prepared plans, the hook
    halves' from low_latency.py's rule."""
    from epcomm.kernels import low_latency as K
    ll = buf._ll
    n = ll.num_sms
    grids = {}
    for key, plan in ll._plans.items():
        if plan.grid:
            grids.setdefault({"d": "dispatch_blocks", "c": "combine_blocks"}.get(key[0], str(key[0])), plan.grid)
    return {"device_sms": n, "threads_per_block": K.THREADS, **grids,
            "dispatch_send_blocks_hook": max(1, min(n, T)), "dispatch_recv_blocks_hook": max(1, min(n, E // world)),
            "combine_send_blocks_hook": n, "combine_recv_blocks_hook": n}


def _ll_worker(rank, world, group, args) -> dict:
    import epcomm
    from epcomm.testing import random_topk
    torch, dist, align = _worker_setup(rank, world, group, args.get("aligner", "clock"))
    T, H, K, E = args["tokens"], args["hidden"], args["topk"], args["experts"]
    iters = args["iters"]
    nbytes = epcomm.Buffer.get_low_latency_rdma_size_hint(T, H, world, E)
    buf = epcomm.Buffer(group, 0, nbytes, low_latency_mode=True)
    rng = np.random.default_rng(99 + rank)
    topk = torch.from_numpy(random_topk(rng, T, E, K)).cuda()
    w = torch.rand(T, K, device="cuda")
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    barrier = align
    sel = int((topk >= 0).sum())
    rb = ll_row_bytes(H)
    fp8_b, bf16_b = sel * rb["dispatch"], sel * rb["combine"]
    # After the Buffer: NVSHMEM is initialised, NVSHMEM_SYMMETRIC_SIZE is what it used.
    out = {"rank": rank, "rdma_bytes": nbytes, "selections": sel, "env": _env_seen(),
           "heap": _heap_report(T, H, E, world, nbytes), "check": {}}
    prog = _Progress(args, "low_latency", rank, out)
    ll = buf._ll
    prog("reference")
    chk = _LLCheck(torch, _gatherer(torch, dist), rank, world, x, topk, w, T, E,
                   ll.partials and not ll.force_put)
    st = {}

    def disp():
        st["d"] = buf.low_latency_dispatch(x, topk, T, E, use_fp8=True)
    prog("ll dispatch")
    out["dispatch_us"] = _median(_time_op(torch, disp, iters, 10, barrier))
    # The same, started by the fixed wait after the all-reduce: how much start skew it leaves in.
    wall = _Aligner(torch, dist, mode="wall")
    out["dispatch_us_wall_aligner"] = _median(_time_op(torch, disp, iters, 10, wall))
    L = E // world
    y = torch.randn(L, world * T, H, device="cuda").to(torch.bfloat16)
    prog("ll combine")
    # The handle stays valid: re-dispatch into the same slot pattern before each combine.
    ts = []
    for i in range(iters + 10):
        disp()
        torch.cuda.synchronize(); barrier()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        handle = st["d"][2]
        s.record(); buf.low_latency_combine(y, topk, w, handle); e.record(); e.synchronize()
        if i >= 10:
            ts.append(s.elapsed_time(e) * 1e3)
    out["combine_us"] = _median(ts)
    # Hook split: send half and receive half timed separately.
    prog("ll hooks")
    sd, rd, sc, rc = [], [], [], []
    for i in range(iters + 10):
        torch.cuda.synchronize(); barrier()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        ev[0].record()
        _, _, h, _, hook = buf.low_latency_dispatch(x, topk, T, E, use_fp8=True, return_recv_hook=True)
        ev[1].record(); ev[1].synchronize(); barrier()
        ev[2].record(); hook(); ev[3].record(); ev[3].synchronize()
        if i >= 10:
            sd.append(ev[0].elapsed_time(ev[1]) * 1e3); rd.append(ev[2].elapsed_time(ev[3]) * 1e3)
        torch.cuda.synchronize(); barrier()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        ev[0].record()
        _, _, hook = buf.low_latency_combine(y, topk, w, h, return_recv_hook=True)
        ev[1].record(); ev[1].synchronize(); barrier()
        ev[2].record(); hook(); ev[3].record(); ev[3].synchronize()
        if i >= 10:
            sc.append(ev[0].elapsed_time(ev[1]) * 1e3); rc.append(ev[2].elapsed_time(ev[3]) * 1e3)
    out.update(dispatch_send_us=_median(sd), dispatch_recv_us=_median(rd),
               combine_send_us=_median(sc), combine_recv_us=_median(rc))
    # Graph replays (their outputs kept for the checks below).
    prog("ll graphs")
    s = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        disp(); torch.cuda.synchronize()
        g1 = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g1, stream=s):
            disp()
        g1_out = st["d"]
    h_g = g1_out[2]
    torch.cuda.synchronize(); barrier()
    out["dispatch_graph_us"] = _median(_time_op(torch, g1.replay, iters, 10, barrier))
    with torch.cuda.stream(s):
        g2 = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g2, stream=s):
            g2_out = buf.low_latency_combine(y, topk, w, h_g)[0]
    torch.cuda.synchronize(); barrier()
    # Replaying the combine graph alone needs its dispatch slot current: alternate replays.
    ts = []
    for i in range(iters + 10):
        g1.replay(); torch.cuda.synchronize(); barrier()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g2.replay(); b.record(); b.synchronize()
        if i >= 10:
            ts.append(a.elapsed_time(b) * 1e3)
    out["combine_graph_us"] = _median(ts)
    # Back to back: 20 replays queued behind one aligned start, so the ranks pace each other as
    # in a decode loop and no start skew is left in the mean (per replay = total / 20).  The
    # combine figure is (dispatch + combine pairs) minus dispatch alone.
    prog("ll graphs back to back")

    def back_to_back(fn, n=20):
        ts = []
        for i in range(max(5, iters // 3) + 2):
            barrier()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(n):
                fn()
            b.record()
            b.synchronize()
            if i >= 2:
                ts.append(a.elapsed_time(b) * 1e3 / n)
        return _median(ts)
    out["dispatch_graph_us_back_to_back"] = back_to_back(g1.replay)
    pair = back_to_back(lambda: (g1.replay(), g2.replay()))
    out["combine_graph_us_back_to_back"] = pair - out["dispatch_graph_us_back_to_back"]
    # Checks of the graphs, untimed: one replay of each, then 20 pairs back to back (a slot race
    # between replays would show there).  From here on y holds the check's expert outputs.
    prog("ll graph checks")
    if chk.y is not None:
        y.copy_(chk.y)
    torch.cuda.synchronize(); barrier()
    g1.replay(); g2.replay(); torch.cuda.synchronize()
    _record_check(out["check"], "dispatch_graph", chk.dispatch(g1_out[0], g1_out[1], h_g))
    _record_check(out["check"], "combine_graph", chk.combine(g2_out))
    torch.cuda.synchronize(); barrier()
    for _ in range(20):
        g1.replay(); g2.replay()
    torch.cuda.synchronize()
    _record_check(out["check"], "dispatch_graph_back_to_back", chk.dispatch(g1_out[0], g1_out[1], h_g))
    _record_check(out["check"], "combine_graph_back_to_back", chk.combine(g2_out))
    # The baseline in the same run: the combine in its other format (EPCOMM_LL_COMBINE_PARTIALS:
    # rows, one bf16 row per (token, expert) as DeepEP's, the default; or expert-side partial
    # sums), measured the same three ways under combine_rows_* or combine_partials_*.
    rows_ab = hasattr(buf._ll, "set_combine_partials")  # False when run against an older epcomm (A/B)
    if rows_ab:
        partials_before = buf._ll.partials
        alt_partials = not partials_before
        alt = "combine_partials" if alt_partials else "combine_rows"
        prog(f"ll {alt}")
        buf._ll.set_combine_partials(alt_partials)
        ts, sc, rc = [], [], []
        for i in range(iters + 10):
            disp()
            torch.cuda.synchronize(); barrier()
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(6)]
            ev[0].record(); buf.low_latency_combine(y, topk, w, st["d"][2]); ev[1].record(); ev[1].synchronize()
            _, _, h, _, hook = buf.low_latency_dispatch(x, topk, T, E, use_fp8=True, return_recv_hook=True)
            hook()
            torch.cuda.synchronize(); barrier()
            ev[2].record()
            _, _, hook = buf.low_latency_combine(y, topk, w, h, return_recv_hook=True)
            ev[3].record(); ev[3].synchronize(); barrier()
            ev[4].record(); hook(); ev[5].record(); ev[5].synchronize()
            if i >= 10:
                ts.append(ev[0].elapsed_time(ev[1]) * 1e3)
                sc.append(ev[2].elapsed_time(ev[3]) * 1e3); rc.append(ev[4].elapsed_time(ev[5]) * 1e3)
        out.update({f"{alt}_us": _median(ts), f"{alt}_send_us": _median(sc), f"{alt}_recv_us": _median(rc)})
        disp()
        got = buf.low_latency_combine(y, topk, w, st["d"][2])[0]
        torch.cuda.synchronize()
        _record_check(out["check"], alt, chk.combine(got, partials=alt_partials and not buf._ll.force_put))
        with torch.cuda.stream(s):
            disp(); torch.cuda.synchronize()
            g1r = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g1r, stream=s):
                disp()
            h_r = st["d"][2]
            g2r = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g2r, stream=s):
                buf.low_latency_combine(y, topk, w, h_r)
        torch.cuda.synchronize(); barrier()
        d_r = back_to_back(g1r.replay)
        out[f"{alt}_graph_us_back_to_back"] = back_to_back(lambda: (g1r.replay(), g2r.replay())) - d_r
        buf._ll.set_combine_partials(partials_before)
    # Host cost per call (not captured, no sync inside the loop), with EPCOMM_CHECK_INDICES=0
    # (the fast paths); the combine's is (combine + dispatch) pairs minus dispatch alone, since
    # a combine needs a live dispatch handle.
    prog("ll host cost")
    torch.cuda.synchronize(); barrier()
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        buf.low_latency_dispatch(x, topk, T, E, use_fp8=True)
    t1 = time.perf_counter()
    torch.cuda.synchronize(); barrier()
    h = buf.low_latency_dispatch(x, topk, T, E, use_fp8=True)[2]
    torch.cuda.synchronize(); barrier()
    t2 = time.perf_counter()
    for _ in range(n):
        buf.low_latency_combine(y, topk, w, h)
        h = buf.low_latency_dispatch(x, topk, T, E, use_fp8=True)[2]
    t3 = time.perf_counter()
    torch.cuda.synchronize(); barrier()
    out["host_us_per_dispatch"] = (t1 - t0) / n * 1e6
    out["host_us_per_combine_plus_dispatch"] = (t3 - t2) / n * 1e6
    out["host_us_per_combine"] = out["host_us_per_combine_plus_dispatch"] - out["host_us_per_dispatch"]
    # With the host index check on (EPCOMM_CHECK_INDICES=1, the library's default): the full
    # path, whose check synchronises the device, so this includes waiting for the GPU.
    os.environ["EPCOMM_CHECK_INDICES"] = "1"
    try:
        n2 = 50
        t0 = time.perf_counter()
        for _ in range(n2):
            buf.low_latency_dispatch(x, topk, T, E, use_fp8=True)
        t1 = time.perf_counter()
    finally:
        os.environ["EPCOMM_CHECK_INDICES"] = "0"
    torch.cuda.synchronize(); barrier()
    out["host_us_per_dispatch_check_indices_on"] = (t1 - t0) / n2 * 1e6
    try:
        out["ll_grid"] = _ll_grids(buf, T, E, world)
    except Exception as e:  # noqa: BLE001 - informational; reads the buffer's private plans
        out["ll_grid"] = {"error": f"{type(e).__name__}: {e}"}
    for k in ("dispatch_us", "dispatch_graph_us", "dispatch_graph_us_back_to_back"):
        out[k.replace("_us", "_GBps")] = gbps(fp8_b, out[k])
    for k in ("combine_us", "combine_graph_us", "combine_graph_us_back_to_back", "combine_rows_us",
              "combine_rows_graph_us_back_to_back", "combine_partials_us", "combine_partials_graph_us_back_to_back"):
        if k in out:
            out[k.replace("_us", "_GBps")] = gbps(bf16_b, out[k])
    prog("ll baselines")
    # Same payload: each destination rank's selections (dispatch), and back (combine).
    valid = topk >= 0
    send_cnt = torch.bincount(topk[valid] // L, minlength=world)
    recv_cnt = torch.empty_like(send_cnt)
    dist.all_to_all_single(recv_cnt, send_cnt)
    send, recv = [int(v) for v in send_cnt.tolist()], [int(v) for v in recv_cnt.tolist()]
    t = _nccl_a2a_rows(torch, dist, send, recv, rb["dispatch"], iters, align)
    out["nccl_dispatch_us"], out["nccl_dispatch_GBps"] = t, gbps(fp8_b, t)
    t = _nccl_a2a_rows(torch, dist, recv, send, rb["combine"], iters, align)
    out["nccl_combine_us"], out["nccl_combine_GBps"] = t, gbps(bf16_b, t)
    out["nccl_even_a2a_us"] = _nccl_even_a2a(torch, dist, T * H, iters, align)
    # Eager checks, untimed: one-kernel calls (the fast paths timed above) and the hook halves.
    prog("ll checks")
    yc = chk.y if chk.y is not None else y
    recv_c, cnt_c, h_c, _, _ = buf.low_latency_dispatch(x, topk, T, E, use_fp8=True)
    torch.cuda.synchronize()
    _record_check(out["check"], "dispatch", chk.dispatch(recv_c, cnt_c, h_c))
    got = buf.low_latency_combine(yc, topk, w, h_c)[0]
    torch.cuda.synchronize()
    _record_check(out["check"], "combine", chk.combine(got))
    recv_c, cnt_c, h_c, _, hook = buf.low_latency_dispatch(x, topk, T, E, use_fp8=True, return_recv_hook=True)
    hook()
    torch.cuda.synchronize()
    _record_check(out["check"], "dispatch_hook", chk.dispatch(recv_c, cnt_c, h_c))
    got, _, hook = buf.low_latency_combine(yc, topk, w, h_c, return_recv_hook=True)
    hook()
    torch.cuda.synchronize()
    _record_check(out["check"], "combine_hook", chk.combine(got))
    out["aligner"] = align.summary()
    prog.save()
    align.close()
    dist.destroy_process_group()
    buf.destroy()
    return out


# --------------------------------------------------------------------------- driver


def _gpu_name() -> str:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
        names = [n.strip() for n in r.stdout.splitlines() if n.strip()]
        return f"{len(names)}x {names[0]}" if names else "unknown"
    except Exception:
        return "unknown"


def _read_partials(path: str, key: str, n: int) -> list:
    out = []
    for r in range(n):
        try:
            with open(os.path.join(path, f"{key}.{r}.json")) as f:
                out.append(json.load(f))
        except (OSError, ValueError):
            pass
    return out


def write_json(res: dict, path: str) -> None:
    """Write ``res`` to ``path`` through a temporary file and a rename: a run killed while
    writing leaves the previous complete file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1, default=str)
    os.replace(tmp, path)


def _nvl_buffer_sizes(args: dict) -> dict:
    """NVLink buffer bytes per rank that epcomm needs for this shape (its size hint: every token
    of every rank may go to every rank) and DeepEP's default hint, for 2, 4 and 8 ranks (issue 3
    asks for the bytes needed; DeepEP's hint at R=8 is about 336 MB)."""
    from epcomm.kernels import intranode as K_intra
    H, N, K = args["hidden"], args["tokens"], args["topk"]
    return {"epcomm_bytes_by_ranks": {R: K_intra.nvl_buffer_size_hint(H, R, N, K) for R in (2, 4, 8)},
            "deepep_hint_bytes_by_ranks": {R: deepep_nvl_buffer_size_hint(H, R) for R in (2, 4, 8)},
            "deepep_hint_settings": "num_sms 20, num_max_nvl_chunked_recv_tokens 256 (DeepEP's defaults)"}


def _summarize_mode(res: dict, key: str) -> None:
    """Mode-level summaries: checks over ranks ("ok" or the failing ranks) and the workers'
    environment (rank 0's) in ``meta``."""
    entry = res[key]
    ranks = [r for r in entry.get("ranks") or () if r]
    checks: dict = {}
    for r in ranks:
        for op, v in (r.get("check") or {}).items():
            _record_check(checks, op, v, f"rank {r.get('rank')}")
    if checks:
        entry["check"] = checks
    if ranks and "env" in ranks[0]:
        res["meta"].setdefault("worker_env", {})[key] = ranks[0]["env"]


def run(what: str, gpus: int, *, tokens=None, hidden=7168, topk=8, experts=256, sms=DEFAULT_SMS,
        iters=30, timeout=540.0, aligner: str = "clock", json_path: str | None = None, report=None) -> dict:
    """Run the benchmark of ``what`` ("normal", "low-latency" or "all") on ``gpus`` ranks (0: all).

    Each mode runs in its own spawn (``timeout`` seconds each).  After each mode the bars are
    recomputed, the JSON is written to ``json_path`` (when given) and ``report(res, key)`` is
    called (the CLI prints the table there).  A mode that fails is recorded as ``{"args",
    "error", "ranks": what its ranks had saved, "partial": True}`` and the next mode still runs.
    Raises ValueError for arguments that cannot run, before anything starts."""
    visible = spawn.gpu_count()
    if gpus < 0 or gpus > visible:
        raise ValueError(f"--gpus {gpus}: {visible} GPU(s) visible (one rank per GPU; 0 = all)")
    if tokens is not None and tokens < 1:
        raise ValueError(f"--tokens {tokens}: expected >= 1 (omit it for the defaults: 4096 normal, 128 low-latency)")
    if aligner not in _Aligner.MODES:
        raise ValueError(f"--aligner {aligner!r}: expected one of {', '.join(_Aligner.MODES)}")
    if iters < 1:
        raise ValueError(f"--iters {iters}: expected >= 1")
    sms = list(sms)
    if what in ("normal", "all") and (not sms or min(sms) < 1):
        raise ValueError(f"--sms {','.join(map(str, sms))}: expected one or more SM counts >= 1")
    n = gpus or visible
    if n < 2 and what != "low-latency":
        raise ValueError(f"the normal-mode benchmark needs 2 or more GPUs; {n} visible "
                         f"(`epcomm bench low-latency` runs one rank on one GPU: local traffic only)")
    if n < 1:
        raise ValueError("no GPU visible")
    meta = {"gpus": _gpu_name(), "world_size": n, "commit": _commit(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kind": envs.BENCH_KIND.get(), "aligner": aligner, "spawn_timeout_s": timeout}
    res: dict = {"meta": meta}
    modes = []
    if what in ("normal", "all"):
        modes.append(("normal", _normal_worker,
                      dict(tokens=tokens or 4096, hidden=hidden, topk=topk, experts=experts, sms=sms, iters=iters,
                           aligner=aligner)))
    if what in ("low-latency", "all"):
        modes.append(("low_latency", _ll_worker,
                      dict(tokens=tokens or 128, hidden=hidden, topk=topk, experts=experts, iters=iters,
                           aligner=aligner)))
    for key, fn, args in modes:
        part = tempfile.mkdtemp(prefix="epcomm-bench-")
        t0 = time.monotonic()
        try:
            entry = {"args": args, "ranks": spawn.run(fn, n, dict(args, partial_dir=part), timeout=timeout)}
        except Exception as e:  # noqa: BLE001 - recorded; the next mode still runs
            entry = {"args": args, "error": f"{type(e).__name__}: {e}", "partial": True,
                     "ranks": _read_partials(part, key, n)}
        finally:
            shutil.rmtree(part, ignore_errors=True)
        entry["wall_s"] = time.monotonic() - t0
        if key == "normal":
            entry["nvl_buffer"] = _nvl_buffer_sizes(args)
        res[key] = entry
        _summarize_mode(res, key)
        res["bars"] = compute_bars(res)
        if json_path:
            write_json(res, json_path)
        if report is not None:
            report(res, key)
    return res


# --------------------------------------------------------------------------- the table


def _nums(vals) -> list[float]:
    return [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)]


def _stat(vals, fmt: str = ".1f") -> str:
    """'mean [min-max]' over ranks ('-' when nothing was measured)."""
    v = _nums(vals)
    if not v:
        return "-"
    if len(v) == 1 or min(v) == max(v):
        return f"{statistics.mean(v):{fmt}}"
    return f"{statistics.mean(v):{fmt}} [{min(v):{fmt}}-{max(v):{fmt}}]"


def _print_error(key: str, entry: dict) -> None:
    if entry.get("error"):
        first = str(entry["error"]).strip().splitlines()
        print(f"!!! {key} FAILED: {' | '.join(first[:6])}")
        if entry.get("partial"):
            print(f"!!! {key}: what {len(entry.get('ranks') or [])} rank(s) measured before the failure follows")


def _print_checks(key: str, entry: dict) -> None:
    ranks = [r for r in entry.get("ranks") or () if r]
    checks = entry.get("check")
    if checks is None:
        if not any("check" in r for r in ranks):
            return  # an older file: no checks were made
        checks = {}
    bad = {op: v for op, v in checks.items() if v != "ok"}
    if not checks:
        print(f"!!! {key}: no result was checked")
    elif bad:
        for op, v in bad.items():
            print(f"!!! CHECK FAILED {key} {op}: {v}")
    else:
        print(f"check against epcomm.reference: ok ({', '.join(checks)})")


def _print_aligner(ranks: list) -> None:
    parts = []
    for r in ranks:
        a = r.get("aligner") or {}
        if not a:
            continue
        s = f"rank {r.get('rank')}: {a.get('mode', 'clock')}"
        if "barriers" in a:
            s += f" {a.get('aligned')}/{a.get('barriers')} aligned"
        if a.get("fallback"):
            s += f" (fell back: {a['fallback']})"
        parts.append(s)
    if parts:
        print("aligner: " + "; ".join(parts))


_NORMAL_OPS = ("dispatch_bf16", "cached_dispatch_bf16", "dispatch_fp8", "dispatch_fp8_colmajor",
               "cached_dispatch_fp8", "combine")


def _print_mode_header(res: dict, key: str, title: str, detail: str) -> tuple[dict, list]:
    """Print a mode's heading (shape, ``detail``) and its error if any; (entry, ranks)."""
    e = res[key]
    a = e.get("args") or {}
    ranks = [r for r in e.get("ranks") or () if r]
    print(f"\n{title}: {a.get('tokens')} tokens/rank, hidden {a.get('hidden')}, top-{a.get('topk')}, "
          f"{a.get('experts')} experts{detail}; mean [min-max] over {len(ranks)} rank(s)")
    _print_error(key, e)
    return e, ranks


def _print_normal(res: dict) -> None:
    iters = (res["normal"].get("args") or {}).get("iters")
    e, ranks = _print_mode_header(res, "normal", "normal mode", f"; per rank the median of {iters} iterations")
    if not ranks:
        return
    print(f"{'SMs':>4} {'operation':24s} {'us':>24s} {'GB/s':>20s}")
    for s in _sms_counts(e):
        for op in _NORMAL_OPS:
            us = [_sms_entry(r, s).get(f"{op}_us") for r in ranks]
            if not _nums(us):
                errs = {_sms_entry(r, s).get(f"{op}_error") for r in ranks} - {None}
                if errs:
                    print(f"{s:>4} {op:24s} error: {errs.pop()}")
                continue
            g = [_sms_entry(r, s).get(f"{op}_GBps") for r in ranks]
            print(f"{s:>4} {op:24s} {_stat(us):>24s} {_stat(g, '.0f'):>20s}")
    r0 = ranks[0]
    line = (f"layout: {_stat([r.get('layout_us') for r in ranks])} us; NVLink buffer "
            f"{r0.get('nvl_buffer_bytes', 0) / 1e6:.0f} MB/rank")
    nvl = e.get("nvl_buffer") or {}
    if nvl:
        ep, dp = nvl["epcomm_bytes_by_ranks"], nvl["deepep_hint_bytes_by_ranks"]
        line += (f" (this shape at R=2/4/8: {' / '.join(f'{v / 1e6:.0f}' for v in ep.values())} MB; DeepEP's "
                 f"hint, 20 SMs: {' / '.join(f'{v / 1e6:.0f}' for v in dp.values())} MB)")
    print(line)
    if any("nccl_dispatch_bf16_us" in r for r in ranks):
        print("NCCL all_to_all_single, same payload (this routing's splits), us and GB/s in the same accounting:")
        for nm in ("dispatch_bf16", "dispatch_fp8", "combine"):
            print(f"  {nm:14s} {_stat([r.get(f'nccl_{nm}_us') for r in ranks]):>24s} us "
                  f"{_stat([r.get(f'nccl_{nm}_GBps') for r in ranks], '.0f'):>20s} GB/s")
    even_us = [r.get("nccl_even_a2a_us", r.get("nccl_all_to_all_us")) for r in ranks]
    even_g = [r.get("nccl_even_a2a_offrank_GBps", r.get("nccl_all_to_all_offrank_GBps")) for r in ranks]
    if _nums(even_us):
        label = ("even split of N x H bf16" if "nccl_even_a2a_us" in r0
                 else "older runs' 'same payload' (N x H bf16, even split)")
        print(f"NCCL all_to_all_single, {label}: {_stat(even_us)} us ({_stat(even_g, '.0f')} GB/s off-rank)")
    pc = [r.get("peer_copy") or {} for r in ranks]
    if any(pc):
        alone = _stat([p.get("unidirectional_GBps") for p in pc], ".0f")
        both = _stat([p.get("all_ranks_at_once_GBps_per_gpu") for p in pc], ".0f")
        print(f"peer copy (copy engine, 1 GiB): rank 0 alone {alone} GB/s; all ranks at once {both} GB/s per GPU")
    spec = [r.get("speculative_outputs") for r in ranks if r.get("speculative_outputs")]
    if spec:
        print("speculative outputs (hits/misses per rank): " + ", ".join(f"{d['hits']}/{d['misses']}" for d in spec))
    _print_aligner(ranks)
    _print_checks("normal", e)


_LL_FIELDS = ("dispatch_us", "dispatch_us_wall_aligner", "dispatch_us_cycles_aligner", "dispatch_graph_us",
              "dispatch_graph_us_back_to_back", "dispatch_send_us", "dispatch_recv_us", "combine_us",
              "combine_graph_us", "combine_graph_us_back_to_back", "combine_send_us", "combine_recv_us",
              "combine_rows_us", "combine_rows_graph_us_back_to_back", "combine_rows_send_us",
              "combine_rows_recv_us", "combine_partials_us", "combine_partials_graph_us_back_to_back",
              "combine_partials_send_us", "combine_partials_recv_us", "host_us_per_dispatch", "host_us_per_combine",
              "host_us_per_combine_plus_dispatch", "host_us_per_dispatch_check_indices_on",
              "nccl_dispatch_us", "nccl_combine_us", "nccl_even_a2a_us", "nccl_all_to_all_us")


def _print_ll(res: dict) -> None:
    e, ranks = _print_mode_header(res, "low_latency", "low-latency", ", FP8 dispatch, BF16 combine; per rank the median")
    if not ranks:
        return
    a = e.get("args") or {}
    for k in _LL_FIELDS:
        vals = [r.get(k) for r in ranks]
        if not _nums(vals):
            continue
        g = k.replace("_us", "_GBps")
        extra = f"  {_stat([r.get(g) for r in ranks], '.0f')} GB/s" if any(g in r for r in ranks) else ""
        print(f"  {k:40s} {_stat(vals):>22s}{extra}")
    heap = ranks[0].get("heap") or {}
    hint = heap.get("deepep_rdma_size_hint")
    if hint is None and all(k in a for k in ("tokens", "hidden", "experts")):
        hint = deepep_ll_rdma_size_hint(a["tokens"], a["hidden"], len(ranks), a["experts"])
    line = f"  symmetric heap: buffer {ranks[0].get('rdma_bytes', 0) / 1e6:.1f} MB/rank"
    if heap.get("nvshmem_symmetric_size"):
        line += f", NVSHMEM_SYMMETRIC_SIZE {heap['nvshmem_symmetric_size'] / 1e6:.1f} MB"
    if hint:
        line += f"; DeepEP's hint for this shape {hint / 1e6:.1f} MB"
    print(line)
    if heap.get("layout"):
        print("  heap layout (MB): " + ", ".join(f"{k.split(' ')[0]} {v / 1e6:.1f}" for k, v in heap["layout"].items()
                                                if k not in ("total", "message_bytes")))
    if ranks[0].get("ll_grid"):
        print(f"  kernel grids: {ranks[0]['ll_grid']}")
    _print_aligner(ranks)
    _print_checks("low_latency", e)


def _print_bars(bars: dict, keys=None) -> None:
    for key in keys or bars:
        b = bars.get(key)
        if not b:
            continue
        print(f"\nbars, {key} ({b.get('world_size')} GPUs; {b.get('rule')}):")
        for k in ("note", "latency_note"):
            if b.get(k):
                print(f"  note: {b[k]}")
        for e in b.get("entries", ()):
            unit = next((u for u in ("GBps", "us", "bytes") if f"threshold_{u}" in e), "")
            v, thr = e.get(f"value_{unit}"), e.get(f"threshold_{unit}")
            verdict = {True: "PASS", False: "FAIL", None: "  --"}[e.get("pass")]
            if unit == "bytes":
                vs, ts = ("-" if v is None else f"{v / 1e6:.1f} MB"), f"{thr / 1e6:.1f} MB"
            else:
                u = {"GBps": " GB/s", "us": " us"}.get(unit, "")
                vs, ts = ("-" if v is None else f"{v:.1f}{u}"), f"{thr:g}{u}"
            at = f" at {e['at_sms']} SMs" if "at_sms" in e else ""
            print(f"  {verdict} {e['bar']}: {e['field']} = {vs}{at} (bar {ts})  [{e['timing']}]")


def print_table(res: dict, modes=None) -> None:
    """Print the results (this version's JSON or an older one's): per mode the medians as mean
    [min-max] over ranks, baselines, heap, aligner, checks (FAIL lines start with '!!!'), then
    the bars.  ``modes``: only these keys ("normal", "low_latency")."""
    m = res.get("meta") or {}
    print(f"# epcomm bench on {m.get('gpus', '?')} (world {m.get('world_size', '?')}), commit {m.get('commit', '?')}"
          + (f", kind {m['kind']}" if m.get("kind") else ""))
    keys = [k for k in (modes or ("normal", "low_latency")) if isinstance(res.get(k), dict)]
    for k in keys:
        (_print_normal if k == "normal" else _print_ll)(res)
    bars = res.get("bars")
    if bars is None and modes is None:
        bars = compute_bars(res)
    if bars:
        _print_bars(bars, keys)


def _report(res: dict, key: str) -> None:
    try:
        print_table(res, modes=(key,))
    except Exception as e:  # noqa: BLE001 - the JSON is written already; never lose the run here
        print(f"epcomm bench: printing the {key} table failed: {type(e).__name__}: {e}", file=sys.stderr)
    sys.stdout.flush()


def main(a) -> int:
    import importlib.util
    if importlib.util.find_spec("torch") is None:
        print("epcomm bench needs torch (CUDA events and the NCCL baseline)", file=sys.stderr)
        return 2
    res = run(a.what, a.gpus, tokens=a.tokens, hidden=a.hidden, topk=a.topk, experts=a.experts, sms=a.sms,
              iters=a.iters, timeout=a.timeout, aligner=getattr(a, "aligner", "clock"), json_path=a.json,
              report=_report)
    if a.json:
        print(f"\nwrote {a.json}")
    failed = [k for k in ("normal", "low_latency") if isinstance(res.get(k), dict)
              and (res[k].get("error") or any(v != "ok" for v in (res[k].get("check") or {}).values()))]
    if failed:
        print(f"!!! epcomm bench: {', '.join(failed)} failed or did not pass its checks (see above)", file=sys.stderr)
        return 1
    return 0
