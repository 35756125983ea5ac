"""The normal-mode worker of ``epcomm bench``: per SM count the full dispatch (BF16, FP8 with
row- and column-major scales), the cached dispatch and the combine, timed, then checked; the
layout, the NCCL baselines of the same payload and the peer-copy bandwidth."""
from __future__ import annotations

import epcomm
from epcomm.tools.bench import defaults as D
from epcomm.tools.bench.accounting import gbps, normal_row_bytes
from epcomm.tools.bench.baselines import nccl_even_a2a, nccl_same_payload, peer_copy
from epcomm.tools.bench.checks import NormalCheck, gatherer, record_check
from epcomm.tools.bench.timing import measure, median, time_op
from epcomm.tools.bench.worker import Progress, env_seen, finish, normal_inputs, worker_setup


def normal_worker(rank, world, group, args) -> dict:
    """One rank's normal-mode results (``args``: tokens, hidden, topk, experts, sms, iters,
    aligner, partial_dir); spawned with :data:`~epcomm.tools.bench.worker.WORKER_ENV`."""
    run = _NormalRun(rank, world, group, args)
    run.prog("reference")
    run.chk = NormalCheck(run.torch, gatherer(run.torch, run.dist), rank, world, run.x, run.xq, run.xs,
                          run.topk, run.w, run.E)
    run.prog("layout")
    run.out["layout_us"] = median(time_op(run.torch, lambda: run.buf.get_dispatch_layout(run.topk, run.E),
                                          run.iters, D.WARMUP, run.align))
    for sms in args["sms"]:
        run.at_sms(sms)
    intra = run.buf._intra
    run.out["speculative_outputs"] = {"hits": intra.spec_hits, "misses": intra.spec_misses}
    run.baselines()
    return run.finish()


class _NormalRun:
    """One rank's state: set-up, inputs and routing, the results so far (``out``)."""

    def __init__(self, rank, world, group, args):
        self.torch, self.dist, self.align = worker_setup(rank, world, group, args.get("aligner", "clock"))
        torch = self.torch
        self.rank, self.world, self.group = rank, world, group
        self.N, self.H, self.K, self.E = args["tokens"], args["hidden"], args["topk"], args["experts"]
        self.iters = args["iters"]
        self.rb = normal_row_bytes(self.H)
        nbytes = epcomm.Buffer.get_nvl_buffer_size_hint(self.H, world, self.N, self.K)
        self.buf = epcomm.Buffer(group, nbytes)
        self.out = {"rank": rank, "nvl_buffer_bytes": nbytes, "env": env_seen(), "sms": {}, "check": {}}
        self.prog = Progress(args, "normal", rank, self.out)
        inp = normal_inputs(torch, rank, self.N, self.H, self.K, self.E)
        self.topk, self.w, self.x, self.xq, self.xs, self.xs_col = inp.topk, inp.w, inp.x, inp.xq, inp.xs, inp.xs_col
        self.ntr, _, nte, itr, _ = self.buf.get_dispatch_layout(self.topk, self.E)
        self.route = dict(num_tokens_per_rank=self.ntr, is_token_in_rank=itr, num_tokens_per_expert=nte,
                          topk_idx=self.topk, topk_weights=self.w)
        self.handle = None  # the last BF16 dispatch's: the baselines take its splits

    def _measure(self, res: dict, sms: int, name: str, fn, nb) -> None:
        """Time ``fn`` into ``res`` (:func:`~epcomm.tools.bench.timing.measure`: ``{name}_us``,
        ``_us_p90``, ``_host_us``, ``_GBps`` with ``nb`` bytes, or ``{name}_error``)."""
        self.prog(f"{name} sms={sms}")
        measure(self.torch, res, name, fn, self.iters, D.WARMUP, self.align, nb)

    def at_sms(self, sms: int) -> None:
        """Every operation at ``sms`` SMs: timed, then checked (``out["sms"][sms]``)."""
        res = self.out["sms"][sms] = {}
        try:
            self.buf.set_num_sms(sms)
        except (ValueError, TypeError) as e:  # e.g. more SMs than the GPU has: alike on every rank
            res["error"] = f"{type(e).__name__}: {e}"
            return
        buf, x, route = self.buf, self.x, self.route
        st = {}

        def disp_bf16():
            st["r"] = buf.dispatch(x, **route)
        self._measure(res, sms, "dispatch_bf16", disp_bf16, None)
        if "r" not in st or "dispatch_bf16_error" in res:
            return
        recv_x, _, _, _, handle, _ = st["r"]
        self.handle = handle
        rows = recv_x.shape[0]
        bf16_b, fp8_b = rows * self.rb["bf16"], rows * self.rb["fp8"]
        res["recv_rows"] = rows
        res["dispatch_bf16_GBps"] = gbps(bf16_b, res["dispatch_bf16_us"])
        y = self.chk.combine_input(recv_x)
        xq, xs = self.xq, self.xs
        # (name, call, bytes, FP8, returns the handle/top-k/counts): timed in this order with the
        # combine after the first two, then checked.
        calls = (("dispatch_fp8", lambda: buf.dispatch((xq, xs), **route), fp8_b, True, True),
                 ("dispatch_fp8_colmajor", lambda: buf.dispatch((xq, self.xs_col), **route), fp8_b, True, True),
                 ("cached_dispatch_bf16", lambda: buf.dispatch(x, handle=handle), bf16_b, False, False),
                 ("cached_dispatch_fp8", lambda: buf.dispatch((xq, xs), handle=handle), fp8_b, True, False))
        for name, call, nbytes, _, _ in calls[:2]:
            self._measure(res, sms, name, call, nbytes)
        self._measure(res, sms, "combine", lambda: buf.combine(y, handle), bf16_b)
        for name, call, nbytes, _, _ in calls[2:]:
            self._measure(res, sms, name, call, nbytes)
        self._check_sms(res, sms, st["r"], calls, y, handle)

    def _check_sms(self, res: dict, sms: int, timed_bf16, calls, y, handle) -> None:
        """Checks, untimed: the timed BF16 dispatch's last outputs, then one more call of each
        other operation (every rank makes the same calls, whatever its comparisons find)."""
        torch, chk, checks, where = self.torch, self.chk, self.out["check"], f"sms={sms}"
        self.prog(f"check sms={sms}")
        torch.cuda.synchronize()
        record_check(checks, "dispatch_bf16", chk.dispatch(timed_bf16, False, True), where)
        for name, call, _, fp8, meta in calls:
            if f"{name}_error" in res:
                continue
            got = call()
            torch.cuda.synchronize()
            record_check(checks, name, chk.dispatch(got, fp8, meta), where)
        if "combine_error" not in res:
            got = self.buf.combine(y, handle)[0]
            torch.cuda.synchronize()
            record_check(checks, "combine", chk.combine(got), where)

    def baselines(self) -> None:
        """NCCL all-to-all of the same payload (the last dispatch's splits: tokens to each rank,
        rows from each rank) and of an even split; the copy engine's peer bandwidth."""
        torch, dist, align, iters, rb, out = self.torch, self.dist, self.align, self.iters, self.rb, self.out
        self.prog("baselines")
        if self.handle is not None:
            out.update(nccl_same_payload(torch, dist, self.ntr.tolist(), self.handle.recv_counts, rb, iters, align))
        N, H, world = self.N, self.H, self.world
        t = nccl_even_a2a(torch, dist, N * H, iters, align)
        out["nccl_even_a2a_us"] = t
        out["nccl_even_a2a_offrank_GBps"] = gbps(N * H * 2 * (world - 1) / world, t)
        self.prog("peer copy")
        out["peer_copy"] = peer_copy(torch, self.rank, world, self.group, 1 << 30, 10, align)

    def finish(self) -> dict:
        return finish(self.out, self.prog, self.align, self.dist, self.buf)
