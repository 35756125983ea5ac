"""The low-latency worker of ``epcomm bench``: the FP8 dispatch and BF16 combine timed eagerly,
as hook halves, as CUDA-graph replays (one per aligned start, and back to back), the combine's
other format as a same-run baseline, the host time per call; NCCL baselines of the same payload;
every output checked against epcomm.reference."""
from __future__ import annotations

import time

import numpy as np

import epcomm
from epcomm import envs
from epcomm.kernels import low_latency as K_ll
from epcomm.runtime.nvshmem import default_symmetric_size
from epcomm.testing import random_topk
from epcomm.tools.bench.accounting import deepep_ll_rdma_size_hint, gbps, heap_breakdown, ll_row_bytes, parse_size
from epcomm.tools.bench.aligner import Aligner
from epcomm.tools.bench.baselines import nccl_a2a_rows, nccl_even_a2a
from epcomm.tools.bench.checks import LLCheck, gatherer, record_check
from epcomm.tools.bench.timing import back_to_back, elapsed_us, events, median, time_op
from epcomm.tools.bench.worker import Progress, env_seen, finish, worker_setup

WARMUP = 10  # untimed iterations before the timed ones of each loop


def heap_report(T: int, H: int, E: int, world: int, nbytes: int) -> dict:
    """The symmetric heap: the buffer's bytes, NVSHMEM_SYMMETRIC_SIZE as seen (after the Buffer:
    what NVSHMEM used), epcomm's default for it, the regions and DeepEP's hint for the shape."""
    raw = envs.external("NVSHMEM_SYMMETRIC_SIZE")
    return {"rdma_bytes": nbytes, "nvshmem_symmetric_size_text": raw,
            "nvshmem_symmetric_size": parse_size(raw),
            "epcomm_default_symmetric_size": default_symmetric_size(nbytes),
            "layout": heap_breakdown(T, H, E, world),
            "deepep_rdma_size_hint": deepep_ll_rdma_size_hint(T, H, world, E)}


def ll_grids(buf, T: int, E: int, world: int) -> dict:
    """Blocks of the low-latency kernels (one per SM while blocks <= SMs; the guide asks for the
    SM count with every result): the one-kernel calls' grids from the prepared plans, the hook
    halves' from low_latency.py's rule."""
    ll = buf._ll
    n = ll.num_sms
    grids = {}
    for key, plan in ll._plans.items():
        if plan.grid:
            grids.setdefault({"d": "dispatch_blocks", "c": "combine_blocks"}.get(key[0], str(key[0])), plan.grid)
    return {"device_sms": n, "threads_per_block": K_ll.THREADS, **grids,
            "dispatch_send_blocks_hook": max(1, min(n, T)), "dispatch_recv_blocks_hook": max(1, min(n, E // world)),
            "combine_send_blocks_hook": n, "combine_recv_blocks_hook": n}


def ll_worker(rank, world, group, args) -> dict:
    """One rank's low-latency results (``args``: tokens, hidden, topk, experts, iters, aligner,
    partial_dir); spawned with :data:`~epcomm.tools.bench.worker.WORKER_ENV`."""
    run = _LLRun(rank, world, group, args)
    run.prog("reference")
    ll = run.buf._ll
    run.chk = LLCheck(run.torch, gatherer(run.torch, run.dist), rank, world, run.x, run.topk, run.w, run.T,
                      run.E, ll.partials, {p: ll.partial_pairs(p) for p in (False, True)})
    run.time_eager()
    run.time_hooks()
    run.time_graphs()
    run.check_graphs()
    if hasattr(ll, "set_combine_partials"):  # False when run against an older epcomm (A/B)
        run.other_combine_format()
    run.host_cost()
    run.grids_and_rates()
    run.baselines()
    run.check_eager()
    return run.finish()


class _LLRun:
    """One rank's state: set-up, inputs, the dispatch whose outputs the combine takes (``st``),
    the CUDA graphs, and the results so far (``out``).  The calls inside timed regions are
    closures over local names, as lean as a call written in the loop."""

    def __init__(self, rank, world, group, args):
        self.torch, self.dist, self.align = worker_setup(rank, world, group, args.get("aligner", "clock"))
        torch = self.torch
        self.rank, self.world = rank, world
        T, H, K, E = self.T, self.H, self.K, self.E = args["tokens"], args["hidden"], args["topk"], args["experts"]
        self.iters = args["iters"]
        nbytes = epcomm.Buffer.get_low_latency_rdma_size_hint(T, H, world, E)
        buf = self.buf = epcomm.Buffer(group, 0, nbytes, low_latency_mode=True)
        rng = np.random.default_rng(99 + rank)
        topk = self.topk = torch.from_numpy(random_topk(rng, T, E, K)).cuda()
        self.w = torch.rand(T, K, device="cuda")
        x = self.x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
        sel = int((topk >= 0).sum())
        self.rb = ll_row_bytes(H)
        self.fp8_b, self.bf16_b = sel * self.rb["dispatch"], sel * self.rb["combine"]
        # After the Buffer: NVSHMEM is initialised, NVSHMEM_SYMMETRIC_SIZE is what it used.
        self.out = {"rank": rank, "rdma_bytes": nbytes, "selections": sel, "env": env_seen(),
                    "heap": heap_report(T, H, E, world, nbytes), "check": {}}
        self.prog = Progress(args, "low_latency", rank, self.out)
        st = self.st = {}

        def disp():
            """The FP8 dispatch; its outputs in ``st["d"]`` (the combine's handle: ``st["d"][2]``)."""
            st["d"] = buf.low_latency_dispatch(x, topk, T, E, use_fp8=True)
        self.disp = disp
        self.hook_disp = lambda: buf.low_latency_dispatch(x, topk, T, E, use_fp8=True, return_recv_hook=True)
        self.y = None  # the combine's input [E / R, R * T, H], made after the dispatch timings

    def _sync(self) -> None:
        self.torch.cuda.synchronize()
        self.align()

    def _timed_after(self, prepare, fn) -> float:
        """Median event time (us) of fn(a), each run after a = prepare(), a device sync and an
        aligned start (:data:`WARMUP` untimed runs first)."""
        ts = []
        for i in range(self.iters + WARMUP):
            arg = prepare()
            self._sync()
            a, b = events(self.torch)
            a.record(); fn(arg); b.record(); b.synchronize()
            if i >= WARMUP:
                ts.append(elapsed_us(a, b))
        return median(ts)

    def _send_recv(self, call):
        """A hook-split call: its send half (``call()``, returning a tuple that ends with the
        receive hook) and, after an aligned start, its receive half (the hook), each timed;
        (what call() returned, send us, receive us)."""
        ev = events(self.torch, 4)
        ev[0].record()
        r = call()
        ev[1].record(); ev[1].synchronize(); self.align()
        ev[2].record(); r[-1](); ev[3].record(); ev[3].synchronize()
        return r, elapsed_us(ev[0], ev[1]), elapsed_us(ev[2], ev[3])

    def _graph(self, stream, fn):
        """A CUDA graph of fn() captured on ``stream``."""
        g = self.torch.cuda.CUDAGraph()
        with self.torch.cuda.graph(g, stream=stream):
            fn()
        return g

    def _graph_pair(self, stream):
        """On ``stream``: one dispatch, then graphs of a dispatch and of a combine of its
        outputs; (dispatch graph, its outputs, combine graph, the combine's output)."""
        torch, buf, st, y, topk, w = self.torch, self.buf, self.st, self.y, self.topk, self.w
        got = {}
        with torch.cuda.stream(stream):
            self.disp(); torch.cuda.synchronize()
            g1 = self._graph(stream, self.disp)
            d = st["d"]

            def comb():
                got["y"] = buf.low_latency_combine(y, topk, w, d[2])[0]
            g2 = self._graph(stream, comb)
        return g1, d, g2, got["y"]

    # ---- steps -------------------------------------------------------------------------

    def time_eager(self) -> None:
        """The one-kernel dispatch (aligned by the requested aligner and by 'wall') and combine."""
        torch, out, buf, st, topk, w, disp = self.torch, self.out, self.buf, self.st, self.topk, self.w, self.disp
        self.prog("ll dispatch")
        out["dispatch_us"] = median(time_op(torch, disp, self.iters, WARMUP, self.align))
        # The same, started by the fixed wait after the all-reduce: how much start skew it leaves in.
        wall = Aligner(torch, self.dist, mode="wall")
        out["dispatch_us_wall_aligner"] = median(time_op(torch, disp, self.iters, WARMUP, wall))
        L = self.E // self.world
        y = self.y = torch.randn(L, self.world * self.T, self.H, device="cuda").to(torch.bfloat16)
        self.prog("ll combine")

        def redispatch():
            # The handle stays valid: re-dispatch into the same slot pattern before each combine.
            disp()
            return st["d"][2]
        out["combine_us"] = self._timed_after(redispatch, lambda h: buf.low_latency_combine(y, topk, w, h))

    def time_hooks(self) -> None:
        """Hook split: send half and receive half timed separately, dispatch then combine."""
        buf, y, topk, w = self.buf, self.y, self.topk, self.w
        self.prog("ll hooks")
        sd, rd, sc, rc = [], [], [], []
        for i in range(self.iters + WARMUP):
            self._sync()
            d, s1, r1 = self._send_recv(self.hook_disp)
            h = d[2]
            self._sync()
            _, s2, r2 = self._send_recv(lambda: buf.low_latency_combine(y, topk, w, h, return_recv_hook=True))
            if i >= WARMUP:
                sd.append(s1); rd.append(r1); sc.append(s2); rc.append(r2)
        self.out.update(dispatch_send_us=median(sd), dispatch_recv_us=median(rd),
                        combine_send_us=median(sc), combine_recv_us=median(rc))

    def time_graphs(self) -> None:
        """Graph replays, one per aligned start, then back to back (their outputs kept for the
        checks): the combine figure back to back is (dispatch + combine pairs) minus dispatch."""
        torch, out, iters, align = self.torch, self.out, self.iters, self.align
        self.prog("ll graphs")
        s = self.stream = torch.cuda.Stream()
        torch.cuda.synchronize()
        with torch.cuda.stream(s):
            self.disp(); torch.cuda.synchronize()
            g1 = self.g1 = self._graph(s, self.disp)
            self.g1_out = self.st["d"]
        self._sync()
        out["dispatch_graph_us"] = median(time_op(torch, g1.replay, iters, WARMUP, align))
        buf, y, topk, w, h_g, got = self.buf, self.y, self.topk, self.w, self.g1_out[2], {}

        def comb():
            got["y"] = buf.low_latency_combine(y, topk, w, h_g)[0]
        with torch.cuda.stream(s):
            g2 = self.g2 = self._graph(s, comb)
        self.g2_out = got["y"]
        self._sync()
        # Replaying the combine graph alone needs its dispatch slot current: alternate replays.
        out["combine_graph_us"] = self._timed_after(g1.replay, lambda _: g2.replay())
        self.prog("ll graphs back to back")
        out["dispatch_graph_us_back_to_back"] = back_to_back(torch, g1.replay, iters, align)
        pair = back_to_back(torch, lambda: (g1.replay(), g2.replay()), iters, align)
        out["combine_graph_us_back_to_back"] = pair - out["dispatch_graph_us_back_to_back"]

    def check_graphs(self) -> None:
        """Checks of the graphs, untimed: one replay of each, then 20 pairs back to back (a slot
        race between replays would show there).  From here on y holds the check's expert outputs."""
        torch, chk, checks, g1, g2 = self.torch, self.chk, self.out["check"], self.g1, self.g2
        self.prog("ll graph checks")
        if chk.y is not None:
            self.y.copy_(chk.y)
        d = self.g1_out
        self._sync()
        g1.replay(); g2.replay(); torch.cuda.synchronize()
        record_check(checks, "dispatch_graph", chk.dispatch(d[0], d[1], d[2]))
        record_check(checks, "combine_graph", chk.combine(self.g2_out))
        self._sync()
        for _ in range(20):
            g1.replay(); g2.replay()
        torch.cuda.synchronize()
        record_check(checks, "dispatch_graph_back_to_back", chk.dispatch(d[0], d[1], d[2]))
        record_check(checks, "combine_graph_back_to_back", chk.combine(self.g2_out))

    def other_combine_format(self) -> None:
        """The baseline in the same run: the combine in its other format (EPCOMM_LL_COMBINE_PARTIALS:
        rows, one bf16 row per (token, expert) as DeepEP's, the default; or expert-side partial
        sums), measured the same three ways under combine_rows_* or combine_partials_*."""
        torch, ll, out, iters, align = self.torch, self.buf._ll, self.out, self.iters, self.align
        buf, st, y, topk, w = self.buf, self.st, self.y, self.topk, self.w
        partials_before = ll.partials
        alt_partials = not partials_before
        alt = "combine_partials" if alt_partials else "combine_rows"
        self.prog(f"ll {alt}")
        ll.set_combine_partials(alt_partials)
        ts, sc, rc = [], [], []
        for i in range(iters + WARMUP):
            self.disp()
            self._sync()
            a, b = events(torch)
            a.record(); buf.low_latency_combine(y, topk, w, st["d"][2]); b.record(); b.synchronize()
            d = self.hook_disp()
            d[-1]()
            h = d[2]
            self._sync()
            _, s_us, r_us = self._send_recv(lambda: buf.low_latency_combine(y, topk, w, h, return_recv_hook=True))
            if i >= WARMUP:
                ts.append(elapsed_us(a, b)); sc.append(s_us); rc.append(r_us)
        out.update({f"{alt}_us": median(ts), f"{alt}_send_us": median(sc), f"{alt}_recv_us": median(rc)})
        self.disp()
        got = buf.low_latency_combine(y, topk, w, st["d"][2])[0]
        torch.cuda.synchronize()
        record_check(out["check"], alt, self.chk.combine(got, partials=alt_partials and not ll.force_put))
        g1r, _, g2r, _ = self._graph_pair(self.stream)
        self._sync()
        d_r = back_to_back(torch, g1r.replay, iters, align)
        out[f"{alt}_graph_us_back_to_back"] = back_to_back(torch, lambda: (g1r.replay(), g2r.replay()),
                                                           iters, align) - d_r
        ll.set_combine_partials(partials_before)

    def host_cost(self) -> None:
        """Host cost per call (not captured, no sync inside the loop), with the host index check
        off (the fast paths); the combine's is (combine + dispatch) pairs minus dispatch alone,
        since a combine needs a live dispatch handle.  Then the dispatch with the check on (the
        library's default): the full path, whose check synchronises the device, so this
        includes waiting for the GPU."""
        buf, x, topk, w, y, T, E, out = self.buf, self.x, self.topk, self.w, self.y, self.T, self.E, self.out
        self.prog("ll host cost")
        self._sync()
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            buf.low_latency_dispatch(x, topk, T, E, use_fp8=True)
        t1 = time.perf_counter()
        self._sync()
        h = buf.low_latency_dispatch(x, topk, T, E, use_fp8=True)[2]
        self._sync()
        t2 = time.perf_counter()
        for _ in range(n):
            buf.low_latency_combine(y, topk, w, h)
            h = buf.low_latency_dispatch(x, topk, T, E, use_fp8=True)[2]
        t3 = time.perf_counter()
        self._sync()
        out["host_us_per_dispatch"] = (t1 - t0) / n * 1e6
        out["host_us_per_combine_plus_dispatch"] = (t3 - t2) / n * 1e6
        out["host_us_per_combine"] = out["host_us_per_combine_plus_dispatch"] - out["host_us_per_dispatch"]
        n2 = 50
        with envs.CHECK_INDICES.scoped(True):
            t0 = time.perf_counter()
            for _ in range(n2):
                buf.low_latency_dispatch(x, topk, T, E, use_fp8=True)
            t1 = time.perf_counter()
        self._sync()
        out["host_us_per_dispatch_check_indices_on"] = (t1 - t0) / n2 * 1e6

    def grids_and_rates(self) -> None:
        """The kernels' grids, and GB/s of every timing in the accounting of ll_row_bytes."""
        out = self.out
        try:
            out["ll_grid"] = ll_grids(self.buf, self.T, self.E, self.world)
        except Exception as e:  # noqa: BLE001 - informational; reads the buffer's private plans
            out["ll_grid"] = {"error": f"{type(e).__name__}: {e}"}
        for k in ("dispatch_us", "dispatch_graph_us", "dispatch_graph_us_back_to_back"):
            out[k.replace("_us", "_GBps")] = gbps(self.fp8_b, out[k])
        for k in ("combine_us", "combine_graph_us", "combine_graph_us_back_to_back", "combine_rows_us",
                  "combine_rows_graph_us_back_to_back", "combine_partials_us",
                  "combine_partials_graph_us_back_to_back"):
            if k in out:
                out[k.replace("_us", "_GBps")] = gbps(self.bf16_b, out[k])

    def baselines(self) -> None:
        """NCCL all-to-all of the same payload: each destination rank's selections (dispatch),
        and back (combine); and of an even split."""
        torch, dist, out, rb, iters, align = self.torch, self.dist, self.out, self.rb, self.iters, self.align
        self.prog("ll baselines")
        valid = self.topk >= 0
        send_cnt = torch.bincount(self.topk[valid] // (self.E // self.world), minlength=self.world)
        recv_cnt = torch.empty_like(send_cnt)
        dist.all_to_all_single(recv_cnt, send_cnt)
        send, recv = [int(v) for v in send_cnt.tolist()], [int(v) for v in recv_cnt.tolist()]
        t = nccl_a2a_rows(torch, dist, send, recv, rb["dispatch"], iters, align)
        out["nccl_dispatch_us"], out["nccl_dispatch_GBps"] = t, gbps(self.fp8_b, t)
        t = nccl_a2a_rows(torch, dist, recv, send, rb["combine"], iters, align)
        out["nccl_combine_us"], out["nccl_combine_GBps"] = t, gbps(self.bf16_b, t)
        out["nccl_even_a2a_us"] = nccl_even_a2a(torch, dist, self.T * self.H, iters, align)

    def check_eager(self) -> None:
        """Eager checks, untimed: one-kernel calls (the fast paths timed above) and the hook halves."""
        torch, chk, checks, buf, topk, w = self.torch, self.chk, self.out["check"], self.buf, self.topk, self.w
        self.prog("ll checks")
        yc = chk.y if chk.y is not None else self.y
        recv_c, cnt_c, h_c, _, _ = buf.low_latency_dispatch(self.x, topk, self.T, self.E, use_fp8=True)
        torch.cuda.synchronize()
        record_check(checks, "dispatch", chk.dispatch(recv_c, cnt_c, h_c))
        got = buf.low_latency_combine(yc, topk, w, h_c)[0]
        torch.cuda.synchronize()
        record_check(checks, "combine", chk.combine(got))
        recv_c, cnt_c, h_c, _, hook = self.hook_disp()
        hook()
        torch.cuda.synchronize()
        record_check(checks, "dispatch_hook", chk.dispatch(recv_c, cnt_c, h_c))
        got, _, hook = buf.low_latency_combine(yc, topk, w, h_c, return_recv_hook=True)
        hook()
        torch.cuda.synchronize()
        record_check(checks, "combine_hook", chk.combine(got))

    def finish(self) -> dict:
        return finish(self.out, self.prog, self.align, self.dist, self.buf)
