"""``epcomm bench normal|low-latency``: timings in DeepEP's accounting, with baselines measured in
the same run (NCCL all-to-all of the same payload, raw copy-engine peer bandwidth).

Method: random data (never zeros), random routing, warm-up, then per iteration: device sync,
a start barrier that lets every GPU leave at the same wall time (:class:`_Aligner`), CUDA events
around one call on the caller's stream; the median of the iterations, then the mean over ranks.
GB/s (DeepEP's accounting, docs/benchmarks.md):
* normal dispatch: bytes of all received rows (the rank's own included) / time; FP8 counts data
  plus scales;
* normal combine: bytes of the rows sent back (= the dispatch's received rows, BF16) / time;
* low-latency: selections (token, expert pairs) x bytes per selection / time, with FP8 bytes per
  selection = H + 4H/128 + 16 and BF16 = 2H.
Requires torch (CUDA events, NCCL baseline).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from . import envs, spawn


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


def _time_op(torch, fn, iters: int, warmup: int, align) -> list[float]:
    """Per-iteration event timings (us) of fn() on the current stream, each started aligned."""
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
        fn()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e) * 1e3)
    return out


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
    """

    MODES = ("clock", "wall")

    def __init__(self, torch, dist, group=None, sleep_us: float = 1500.0, mode: str = "clock"):
        if mode not in self.MODES:
            raise ValueError(f"aligner mode {mode!r}: expected one of {self.MODES}")
        if mode == "clock" and group is None:
            raise ValueError("aligner mode 'clock' needs the epcomm group (CUDA IPC handles are exchanged)")
        from .jit import loader
        from .jit.launch import launch
        from .kernels import timing as K
        self.torch, self.dist, self.mode = torch, dist, mode
        self._launch = launch
        dev = torch.cuda.current_device()
        mod = loader.load(K.SpinWaitSpec(), dev)
        if mode == "wall":
            self.t = torch.zeros(1, device="cuda")
            self._fn, self._threads = mod.fn("spin_wait_ns"), K.SpinWaitSpec().threads
            self._p = K.SpinParams()
            self._p.ns = int(sleep_us * 1e3)
            return
        from . import _cuda
        self._cuda = _cuda
        self._fn, self._threads = mod.fn("start_barrier"), K.ALIGN_THREADS
        self.chan = _cuda.mem_alloc(K.ALIGN_CHANNEL_BYTES)
        _cuda.memset_d8_async(self.chan, 0, K.ALIGN_CHANNEL_BYTES, torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        handles = group.allgather_bytes(_cuda.ipc_get_handle(self.chan))
        self.opened = []
        p = K.AlignParams()
        for r, h in enumerate(handles):
            if r == group.rank:
                p.chan[r] = self.chan
            else:
                p.chan[r] = _cuda.ipc_open(h)
                self.opened.append(p.chan[r])
        self.report = torch.zeros(3, dtype=torch.int64, device="cuda")
        p.lead_ns, p.cap_ns = int(sleep_us * 1e3), 200_000_000
        p.report = self.report.data_ptr()
        p.rank, p.num_ranks = group.rank, group.size
        self._p = p
        self.reports: list[tuple[int, int, int]] = []
        group.barrier()  # every channel zeroed before anyone pings

    def __call__(self):
        torch = self.torch
        torch.cuda.synchronize()
        stream = torch.cuda.current_stream().cuda_stream
        if self.mode == "wall":
            self.dist.all_reduce(self.t)
        else:
            if self._p.seq:
                self.reports.append(tuple(int(v) for v in self.report.tolist()))
            self._p.seq += 1
        self._launch(self._fn, 1, self._threads, stream, self._p)

    def summary(self) -> dict:
        """Clock offset of this GPU vs rank 0's, best round trip and how many barriers aligned."""
        if self.mode != "clock" or not self.reports:
            return {}
        offs = [r[0] for r in self.reports if r[2]]
        rtts = [r[1] for r in self.reports if r[2]]
        return {"barriers": len(self.reports), "aligned": sum(r[2] for r in self.reports),
                "clock_offset_us_vs_rank0": _median(offs) / 1e3 if offs else None,
                "clock_offset_spread_us": (max(offs) - min(offs)) / 1e3 if offs else None,
                "round_trip_us": _median(rtts) / 1e3 if rtts else None}

    def close(self) -> None:
        if self.mode == "clock":
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


def _nccl_a2a(torch, dist, numel: int, iters: int, align) -> float:
    x = torch.randn(numel, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ts = _time_op(torch, lambda: dist.all_to_all_single(y, x), iters, 5, align)
    return _median(ts)


def _peer_copy(torch, rank, world, group, nbytes: int, iters: int, align) -> dict:
    """Copy-engine bandwidth into the next rank's memory (CUDA IPC), alone and all at once."""
    from . import _cuda
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst_local = _cuda.mem_alloc(nbytes)
    hs = group.allgather_bytes(_cuda.ipc_get_handle(dst_local))
    peer = _cuda.ipc_open(hs[(rank + 1) % world])
    stream = torch.cuda.current_stream().cuda_stream
    res = {}

    def copy():
        _cuda.memcpy_dtod_async(peer, src.data_ptr(), nbytes, stream)

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
    _cuda.ipc_close(peer)
    _cuda.mem_free(dst_local)
    return res


def _worker_setup(rank, world, group):
    """Device, no host index checks (they sync), NCCL for the baselines and the aligner."""
    import torch
    torch.cuda.set_device(rank)
    os.environ["EPCOMM_CHECK_INDICES"] = "0"
    spawn.phase("setup")
    dist = _nccl_init(torch, rank, world, group)
    return torch, dist, _Aligner(torch, dist, group)


def _normal_worker(rank, world, group, args) -> dict:
    import numpy as np

    import epcomm
    from epcomm.testing import random_topk
    torch, dist, align = _worker_setup(rank, world, group)
    N, H, K, E = args["tokens"], args["hidden"], args["topk"], args["experts"]
    iters = args["iters"]
    nbytes = epcomm.Buffer.get_nvl_buffer_size_hint(H, world, N, K)
    buf = epcomm.Buffer(group, nbytes)
    rng = np.random.default_rng(1234 + rank)
    topk = torch.from_numpy(random_topk(rng, N, E, K)).cuda()
    w = torch.rand(N, K, device="cuda")
    x = torch.randn(N, H, device="cuda").to(torch.bfloat16)
    xq = x.float().clamp(-448, 448).to(torch.float8_e4m3fn)
    xs = torch.rand(N, H // 128, device="cuda") + 0.5
    ntr, _, nte, itr, _ = buf.get_dispatch_layout(topk, E)
    barrier = align
    out = {"rank": rank, "nvl_buffer_bytes": nbytes, "sms": {}}
    spawn.phase("layout")
    lt = _time_op(torch, lambda: buf.get_dispatch_layout(topk, E), iters, 5, barrier)
    out["layout_us"] = _median(lt)
    for sms in args["sms"]:
        buf.set_num_sms(sms)
        spawn.phase(f"dispatch bf16 sms={sms}")
        state = {}

        def disp_bf16():
            state["r"] = buf.dispatch(x, num_tokens_per_rank=ntr, is_token_in_rank=itr, num_tokens_per_expert=nte,
                                      topk_idx=topk, topk_weights=w)
        t_bf16 = _median(_time_op(torch, disp_bf16, iters, 5, barrier))
        recv_x, _, _, _, handle, _ = state["r"]
        rows = recv_x.shape[0]
        spawn.phase(f"dispatch fp8 sms={sms}")

        def disp_fp8():
            buf.dispatch((xq, xs), num_tokens_per_rank=ntr, is_token_in_rank=itr, num_tokens_per_expert=nte,
                         topk_idx=topk, topk_weights=w)
        t_fp8 = _median(_time_op(torch, disp_fp8, iters, 5, barrier))
        spawn.phase(f"combine sms={sms}")
        y = recv_x.clone()
        t_comb = _median(_time_op(torch, lambda: buf.combine(y, handle), iters, 5, barrier))
        spawn.phase(f"cached dispatch sms={sms}")
        t_cached = _median(_time_op(torch, lambda: buf.dispatch(x, handle=handle), iters, 5, barrier))
        bf16_bytes = rows * H * 2
        fp8_bytes = rows * (H + H // 128 * 4)
        out["sms"][sms] = {
            "recv_rows": rows,
            "dispatch_bf16_us": t_bf16, "dispatch_bf16_GBps": bf16_bytes / t_bf16 / 1e3,
            "dispatch_fp8_us": t_fp8, "dispatch_fp8_GBps": fp8_bytes / t_fp8 / 1e3,
            "combine_us": t_comb, "combine_GBps": bf16_bytes / t_comb / 1e3,
            "cached_dispatch_bf16_us": t_cached, "cached_dispatch_bf16_GBps": bf16_bytes / t_cached / 1e3,
        }
    st = buf._intra
    out["speculative_outputs"] = {"hits": st.spec_hits, "misses": st.spec_misses}
    spawn.phase("baselines")
    t_a2a = _nccl_a2a(torch, dist, N * H, iters, align)
    out["nccl_all_to_all_us"] = t_a2a
    out["nccl_all_to_all_offrank_GBps"] = N * H * 2 * (world - 1) / world / t_a2a / 1e3
    out["peer_copy"] = _peer_copy(torch, rank, world, group, 1 << 30, 10, align)
    out["aligner"] = align.summary()
    align.close()
    dist.destroy_process_group()
    buf.destroy()
    return out


def _ll_worker(rank, world, group, args) -> dict:
    import numpy as np

    import epcomm
    from epcomm.testing import random_topk
    torch, dist, align = _worker_setup(rank, world, group)
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
    fp8_b = sel * (H + H // 128 * 4 + 16)
    bf16_b = sel * H * 2
    out = {"rank": rank, "rdma_bytes": nbytes, "selections": sel}
    st = {}

    def disp():
        st["d"] = buf.low_latency_dispatch(x, topk, T, E, use_fp8=True)
    spawn.phase("ll dispatch")
    out["dispatch_us"] = _median(_time_op(torch, disp, iters, 10, barrier))
    # The same, started by the fixed wait after the all-reduce: how much start skew it leaves in.
    out["dispatch_us_wall_aligner"] = _median(_time_op(torch, disp, iters, 10, _Aligner(torch, dist, mode="wall")))
    recv, cnt, handle, _, _ = st["d"]
    L = E // world
    y = torch.randn(L, world * T, H, device="cuda").to(torch.bfloat16)

    def comb():
        buf.low_latency_combine(y, topk, w, handle)
    spawn.phase("ll combine")
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
    spawn.phase("ll hooks")
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
    # Graph replays.
    spawn.phase("ll graphs")
    s = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        disp(); torch.cuda.synchronize()
        g1 = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g1, stream=s):
            disp()
        h_g = st["d"][2]
    torch.cuda.synchronize(); barrier()
    out["dispatch_graph_us"] = _median(_time_op(torch, g1.replay, iters, 10, barrier))
    with torch.cuda.stream(s):
        g2 = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g2, stream=s):
            buf.low_latency_combine(y, topk, w, h_g)
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
    spawn.phase("ll graphs back to back")

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
    # The baseline in the same run: the combine without expert-side partials (one bf16 row per
    # (token, expert), as DeepEP's), measured the same three ways.
    spawn.phase("ll combine without partials")
    rows_ab = hasattr(buf._ll, "set_combine_partials")  # False when run against an older epcomm (A/B)
    if rows_ab:
        buf._ll.set_combine_partials(False)
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
        out.update(combine_rows_us=_median(ts), combine_rows_send_us=_median(sc), combine_rows_recv_us=_median(rc))
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
        out["combine_rows_graph_us_back_to_back"] = back_to_back(lambda: (g1r.replay(), g2r.replay())) - d_r
        buf._ll.set_combine_partials(True)
    # Host cost per call (not captured, no sync inside the loop).
    spawn.phase("ll host cost")
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
    for k in ("dispatch_us", "dispatch_graph_us", "dispatch_graph_us_back_to_back"):
        out[k.replace("_us", "_GBps")] = fp8_b / out[k] / 1e3
    for k in ("combine_us", "combine_graph_us", "combine_graph_us_back_to_back", "combine_rows_us",
              "combine_rows_graph_us_back_to_back"):
        if k in out:
            out[k.replace("_us", "_GBps")] = bf16_b / out[k] / 1e3
    spawn.phase("baseline")
    out["nccl_all_to_all_us"] = _nccl_a2a(torch, dist, T * H, iters, align)
    out["aligner"] = align.summary()
    align.close()
    dist.destroy_process_group()
    buf.destroy()
    return out


def _gpu_name() -> str:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
        names = [n.strip() for n in r.stdout.splitlines() if n.strip()]
        return f"{len(names)}x {names[0]}" if names else "unknown"
    except Exception:
        return "unknown"


def run(what: str, gpus: int, *, tokens=None, hidden=7168, topk=8, experts=256, sms=(8, 16, 24, 32),
        iters=30, timeout=540.0) -> dict:
    visible = spawn.gpu_count()
    if gpus < 0 or gpus > visible:
        raise ValueError(f"--gpus {gpus}: {visible} GPU(s) visible (one rank per GPU; 0 = all)")
    if tokens is not None and tokens < 1:
        raise ValueError(f"--tokens {tokens}: expected >= 1 (omit it for the defaults: 4096 normal, 128 low-latency)")
    n = gpus or visible
    if n < 2 and what != "low-latency":
        raise ValueError(f"the normal-mode benchmark needs 2 or more GPUs; {n} visible "
                         f"(`epcomm bench low-latency` runs one rank on one GPU: local traffic only)")
    if n < 1:
        raise ValueError("no GPU visible")
    meta = {"gpus": _gpu_name(), "world_size": n, "commit": _commit(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kind": envs.BENCH_KIND.get()}
    res = {"meta": meta}
    if what in ("normal", "all"):
        args = dict(tokens=tokens or 4096, hidden=hidden, topk=topk, experts=experts, sms=list(sms), iters=iters)
        res["normal"] = {"args": args, "ranks": spawn.run(_normal_worker, n, args, timeout=timeout)}
    if what in ("low-latency", "all"):
        args = dict(tokens=tokens or 128, hidden=hidden, topk=topk, experts=experts, iters=iters)
        res["low_latency"] = {"args": args, "ranks": spawn.run(_ll_worker, n, args, timeout=timeout)}
    return res


def print_table(res: dict) -> None:
    m = res["meta"]
    print(f"# epcomm bench on {m['gpus']} (world {m['world_size']}), commit {m['commit']}")
    if "normal" in res:
        r0 = res["normal"]["ranks"]
        a = res["normal"]["args"]
        print(f"\nnormal mode: {a['tokens']} tokens/rank, hidden {a['hidden']}, top-{a['topk']}, {a['experts']} experts; "
              f"median over {a['iters']} iterations, mean over ranks")
        print(f"{'SMs':>4} {'disp bf16 us':>13} {'GB/s':>7} {'disp fp8 us':>12} {'GB/s':>7} {'combine us':>11} "
              f"{'GB/s':>7} {'cached us':>10}")
        for sms in a["sms"]:
            def avg(k):
                return statistics.mean(r["sms"][sms][k] if sms in r["sms"] else r["sms"][str(sms)][k] for r in r0)
            print(f"{sms:>4} {avg('dispatch_bf16_us'):>13.1f} {avg('dispatch_bf16_GBps'):>7.0f} "
                  f"{avg('dispatch_fp8_us'):>12.1f} {avg('dispatch_fp8_GBps'):>7.0f} {avg('combine_us'):>11.1f} "
                  f"{avg('combine_GBps'):>7.0f} {avg('cached_dispatch_bf16_us'):>10.1f}")
        print(f"layout: {statistics.mean(r['layout_us'] for r in r0):.1f} us; NCCL all_to_all_single same payload: "
              f"{statistics.mean(r['nccl_all_to_all_us'] for r in r0):.1f} us "
              f"({statistics.mean(r['nccl_all_to_all_offrank_GBps'] for r in r0):.0f} GB/s off-rank); peer copy "
              f"{r0[0]['peer_copy']}; NVLink buffer {r0[0]['nvl_buffer_bytes'] / 1e6:.0f} MB/rank")
    if "low_latency" in res:
        r0 = res["low_latency"]["ranks"]
        a = res["low_latency"]["args"]

        def avg(k):
            return statistics.mean(r[k] for r in r0)
        print(f"\nlow-latency: {a['tokens']} tokens/rank, hidden {a['hidden']}, top-{a['topk']}, {a['experts']} "
              f"experts, FP8 dispatch, BF16 combine (mean over ranks of medians)")
        for k in ("dispatch_us", "dispatch_us_wall_aligner", "dispatch_graph_us", "dispatch_graph_us_back_to_back",
                  "dispatch_send_us", "dispatch_recv_us", "combine_us", "combine_graph_us",
                  "combine_graph_us_back_to_back", "combine_send_us", "combine_recv_us", "combine_rows_us",
                  "combine_rows_graph_us_back_to_back", "combine_rows_send_us", "combine_rows_recv_us",
                  "host_us_per_dispatch",
                  "host_us_per_combine_plus_dispatch", "nccl_all_to_all_us"):
            if k not in r0[0]:
                continue
            extra = ""
            g = k.replace("_us", "_GBps")
            if g in r0[0]:
                extra = f"  ({avg(g):.0f} GB/s)"
            print(f"  {k:36s} {avg(k):8.1f}{extra}")
        print(f"  symmetric heap: {r0[0]['rdma_bytes'] / 1e6:.0f} MB/rank")


def main(a) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        print("epcomm bench needs torch (CUDA events and the NCCL baseline)", file=sys.stderr)
        return 2
    res = run(a.what, a.gpus, tokens=a.tokens, hidden=a.hidden, topk=a.topk, experts=a.experts, sms=a.sms,
              iters=a.iters, timeout=a.timeout)
    print_table(res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print(f"\nwrote {a.json}")
    return 0
