"""Soak: thousands of random dispatch / combine calls in both modes, every result checked.

    python benchmarks/soak.py --ranks 2 --calls 10000 --seed 1 --time-limit 540 --json soak.json

One Buffer per rank with both modes (normal intranode and low-latency).  ``--cases`` random
cases (:mod:`soak_check`: tokens per rank 0..4096 in the normal mode, 0..T with T in {128, 256}
in the low-latency mode, different per rank; hidden 2048 / 2880 / 4096 / 7168 (multiples of 128
in the low-latency mode); top-k 1..8 with -1 slots; BF16 and FP8 (scales row- or column-major,
power-of-two, UE8M0); some normal dispatches with ``num_worst_tokens``).

Checking, cheap per call: each case's first call (the warm-up pass over every case) is compared
with ``epcomm.reference`` bit for bit on the CPU, and ``get_dispatch_layout``'s outputs with a
hash of the reference's layout; the first call's outputs' hashes are kept, and every later call
of the case must hash to the same bits (hashes are a few elementwise passes and one reduction
per output on the GPU, no copy to the host).  The warm-up then makes every kind of call once per
case (hash-checked), so what a kind allocates the first time is there before the first memory
sample.  After it, calls pick a random case and one of: a full dispatch (with or without the
layout given) + combine, a cached dispatch (the first dispatch's handle), a combine alone, in
the low-latency mode an eager dispatch + combine, the same with receive hooks, or a replay of
the case's CUDA graph (captured in the warm-up), interleaved.  Every rank derives the same
schedule from ``--seed``.  A call counts once per collective operation (layout, dispatch,
combine), per rank: ``calls`` in the JSON is the least of the ranks' counts.

Measured: calls, mismatches (with the case and the parts that differ; for the first
``DETAIL_LIMIT`` of each rank also which elements differ from the reference and their first
values, the call's kind, its low-latency slot, the slots' tags and the low-latency call before
it: ``mismatch_values``, the only time outputs are copied to the host), hangs (EpcommTimeoutError
within EPCOMM_TIMEOUT_S, set to 60 s here unless given; a hang the kernels do not see ends the
spawn before the time limit), GPU memory (torch allocated and reserved, the device's used
memory) and host RSS, sampled every 32 iterations with every rank idle and the allocators'
cached free blocks released, and their drift after the warm-up.  ``passed`` (exit status 0)
needs the run complete, ``--calls`` reached by every rank, no mismatch, no hang and every drift
within 1%.  Ranks agree every 16 iterations whether to stop (``--calls`` reached, or
``--time-limit`` less 45 s passed); the spawn is ended 15 s before ``--time-limit`` (from this
script's start), so the JSON is written by then even after a hang; each rank writes its
progress at every sample, so a cut run still reports what it did (``complete: false``).

Ranks share one GPU with ``EPCOMM_SHARE_GPU=1`` (set here when ``--ranks`` exceeds the GPUs).
A cold JIT cache compiles about 20 kernels first (``epcomm warmup`` or an earlier run fills it).

Expected time, 2 ranks sharing one H100.  The warm-up is dominated by the CPU reference of each
case, which every rank computes for all ranks (in parallel): measured on a 2-core CPU host for
the 24 cases of --seed 1, 31 s with 2 ranks (the largest, 2 x 4096 tokens at hidden 7168: 4.4 s
of reference, 1.3 s of inputs; a low-latency case at hidden 7168 with 32 experts: 2-4 s) and
85 s with 4 ranks (up to 15 s a case), plus the first compile on a cold cache and 12 graph
captures.  After it, an iteration is 1-3 collective calls (1.9 on average), one host sync, and
hashes of outputs of up to ~60 M elements (each pass over int64 words of up to ~0.5 GB: a few
ms a case at most, both ranks taking turns on the GPU); the normal mode's CPU-synchronised
dispatch measured 2.5-5 ms with 2 ranks sharing an H100 (4096 tokens, hidden 7168).  So an
iteration is ~5-20 ms, 10,000 calls ~5,300 iterations, ~30-110 s: the warm-up and the first
compile dominate, and 10,000 calls with 2 ranks (2,000 with 4) fit a 540 s limit with several
times the estimate to spare.  A reference check of every call instead would not (5,300 x ~1-2 s
of CPU); the hashes are what makes every call checked.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np

from soak_check import (Tracker, case_inputs, diff_ll, diff_normal, drift, hash_parts, layout_parts, ll_parts,
                        ll_reference, make_case, normal_parts, normal_reference, reference_layout, to_torch, verdict,
                        verify_ll, verify_normal)

AGREE_EVERY = 16                 # iterations between the ranks' agreement on stopping
SAMPLE_EVERY = 2 * AGREE_EVERY   # iterations between memory samples (at an agreement point)
# Seconds of --time-limit kept for the end: the ranks stop calling STOP_MARGIN_S before it (then
# synchronise, sample, destroy the Buffer), the spawn ends them SPAWN_MARGIN_S before it (a hang),
# and what is left is the parent's, to write the JSON before an outer limit of --time-limit.
STOP_MARGIN_S, SPAWN_MARGIN_S = 45.0, 15.0
NORMAL_KINDS = ("dispatch", "dispatch_layout", "cached", "combine")
LL_KINDS = ("eager", "hook", "graph", "graph")
# Mismatches per rank whose differing elements are recorded (each recomputes its case's
# reference on the CPU, a few seconds at most, and copies the call's outputs to the host).
DETAIL_LIMIT = 4


def plan(seed: int, R: int, n_cases: int, max_tokens: int) -> list:
    """The cases, the same on every rank: half normal, half low-latency."""
    rng = np.random.default_rng(seed)
    return [make_case(rng, i, R, "normal" if i % 2 == 0 else "ll", max_tokens) for i in range(n_cases)]


def schedule(seed: int, cases: list):
    """(case, kind) of every call after the warm-up, endless, the same on every rank."""
    rng = np.random.default_rng(seed + 1)
    while True:
        c = cases[int(rng.integers(len(cases)))]
        kinds = NORMAL_KINDS if c.mode == "normal" else LL_KINDS
        yield c, kinds[int(rng.integers(len(kinds)))]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class Soak:
    """One rank's soak: the Buffer, the cases' device inputs, handles and graphs, the tracker."""

    def __init__(self, rank: int, world: int, group, cases: list, progress: str, max_tokens: int = 4096):
        import torch

        import epcomm
        self.torch, self.rank, self.world, self.group = torch, rank, world, group
        torch.cuda.set_device(rank % torch.cuda.device_count())
        Tmax = max([c.T for c in cases if c.mode == "ll"], default=128)
        Emax = max([c.E for c in cases if c.mode == "ll"], default=16)
        nvl = epcomm.Buffer.get_nvl_buffer_size_hint(7168, world, max(max_tokens, 1), 8)
        rdma = epcomm.Buffer.get_low_latency_rdma_size_hint(Tmax, 7168, world, Emax)
        self.buf = epcomm.Buffer(group, nvl, rdma, low_latency_mode=True)
        self.cases, self.state, self.t = cases, {}, Tracker()
        self.progress, self.memory, self.kinds = progress, [], {}
        self.warm_iters, self.start = 0, time.time()
        self.details: list = []       # mismatch_values (see the module docstring)
        self.prev_ll = None           # [call, case, kind, slot] of the last low-latency call

    # ---- inputs on the device --------------------------------------------------------------
    def _reference(self, case) -> tuple[dict, dict]:
        """(every rank's inputs, the reference) of ``case``, on the CPU (the same every time)."""
        inp = case_inputs(case, self.world)
        if case.mode == "normal":
            return inp, normal_reference(case, self.world, inp)
        ll = self.buf._ll
        return inp, ll_reference(case, self.world, inp, partials=ll.partial_pairs())

    def _first(self, case) -> None:
        """The case's first call: inputs up, the reference, dispatch + combine, checked."""
        r, R = self.rank, self.world
        inp, ref = self._reference(case)
        s = self.state[case.index] = {}
        s["x"] = to_torch(inp["xs"][r])
        if inp["scales"] is not None:
            s["x"] = (s["x"], to_torch(inp["scales"][r], col_major=case.col_scales))
        s["idx"], s["w"] = to_torch(inp["idx"][r]), to_torch(inp["w"][r])
        call, slot = self.t.calls, None
        if case.mode == "normal":
            s["y"], s["rows"] = to_torch(ref["y"][r]), ref["dispatch"][r].handle.num_recv_tokens
            # get_dispatch_layout's outputs (kind "dispatch_layout") are compared with this hash
            self.t.hashes[(case.index, "layout")] = hash_parts(reference_layout(case, R, inp, r))
            parts, comb = self._normal_full(case, s, layout=False)
            bad = verify_normal(parts, comb, ref, r)
        else:
            s["y"] = to_torch(ref["y"][r])
            parts, comb, slot = self._ll_eager(case, s, hook=False)
            bad = verify_ll(parts, comb, ref, r)
        self.t.first((case.index, "all"), self._hash(parts, comb), bad, self.t.calls)
        self._explain(bad, call, case, "first", parts, comb, slot, ref)

    # ---- a mismatch, in detail ------------------------------------------------------------
    def _explain(self, bad: list, call: int, case, kind: str, parts: dict, combined, slot, ref=None) -> None:
        """After a call of ``case`` whose parts ``bad`` differed: for the first DETAIL_LIMIT
        mismatches, what differs from the reference (its outputs copied to the host now, the
        reference recomputed unless given), with the call's context.  Then, for low-latency
        calls, remember this one as the previous."""
        if bad and len(self.details) < DETAIL_LIMIT:
            if ref is None:
                ref = self._reference(case)[1]
            diff = (diff_normal if case.mode == "normal" else diff_ll)(parts, combined, ref, self.rank)
            rec = dict(call=call, case=case.index, kind=kind, parts=bad, diff=diff)
            if case.mode == "ll":
                rec.update(slot=slot, tags=self._ll_tags(), previous_ll=self.prev_ll)
            self.details.append(rec)
        if case.mode == "ll":
            self.prev_ll = [call, case.index, kind, slot]

    def _ll_tags(self) -> dict:
        """The low-latency slots' tags (each slot's count of uses, as the kernels keep them in the
        engine's control words) once the device is idle."""
        from epcomm.kernels import low_latency as K
        from epcomm.runtime import driver
        ll = self.buf._ll
        ctrl = K.LLCtrl()
        self.torch.cuda.synchronize()
        with driver.on_device(ll.device_id):
            driver.memcpy_dtoh(ctypes.addressof(ctrl), ll.ctrl, ctypes.sizeof(ctrl))
        return dict(dispatch=list(ctrl.disp_seq), combine=list(ctrl.comb_seq), failed=int(ctrl.failed))

    def _hash(self, parts: dict, combined) -> dict:
        h = hash_parts(parts)
        comb = combined if isinstance(combined, tuple) else (combined,)
        h.update({f"combined_{i}": v for i, v in enumerate(hash_parts(
            {f"c{i}": c for i, c in enumerate(comb) if c is not None}).values())})
        return h

    # ---- the normal mode -------------------------------------------------------------------
    def _normal_full(self, case, s: dict, layout: bool):
        b = self.buf
        route = dict(topk_idx=s["idx"], topk_weights=s["w"], num_worst_tokens=case.worst)
        if layout:
            ntr, _, nte, itr, _ = b.get_dispatch_layout(s["idx"], case.E)
            route.update(num_tokens_per_rank=ntr, num_tokens_per_expert=nte, is_token_in_rank=itr)
            self.t.calls += 1
            self.t.repeat((case.index, "layout"), hash_parts(layout_parts(ntr, nte, itr)), self.t.calls)
        else:
            route["num_experts"] = case.E
        res = b.dispatch(s["x"], **route)
        s["handle"], s["w_recv"] = res[4], res[2]  # for the combines alone (every dispatch's are equal)
        comb = b.combine(s["y"], res[4], topk_weights=res[2])
        self.t.calls += 2
        return normal_parts(res, s["rows"]), comb[:2]

    def _normal_call(self, case, kind: str, call: int) -> None:
        s, key = self.state[case.index], (case.index, "all")
        want = self.t.hashes[key]
        if kind in ("dispatch", "dispatch_layout"):
            parts, comb = self._normal_full(case, s, layout=kind == "dispatch_layout")
            bad = self.t.repeat(key, self._hash(parts, comb), call)
        elif kind == "cached":
            res = self.buf.dispatch(s["x"], handle=s["handle"])
            self.t.calls += 1
            parts = {k: v for k, v in normal_parts(res, s["rows"]).items() if k in ("recv_x", "recv_scales")}
            comb = None
            got = hash_parts(parts)
            self.t.hashes[(case.index, "cached")] = {k: want[k] for k in got}
            bad = self.t.repeat((case.index, "cached"), got, call)
        else:
            parts, comb = {}, self.buf.combine(s["y"], s["handle"], topk_weights=s["w_recv"])[:2]
            self.t.calls += 1
            got = self._hash({}, comb)
            self.t.hashes[(case.index, "combine")] = {k: want[k] for k in got}
            bad = self.t.repeat((case.index, "combine"), got, call)
        self._explain(bad, call, case, kind, parts, comb, None)

    # ---- the low-latency mode --------------------------------------------------------------
    def _ll_dispatch(self, case, s: dict, hook: bool):
        b = self.buf
        rx, cnt, h, _, hk = b.low_latency_dispatch(s["x"], s["idx"], case.T, case.E, use_fp8=case.fp8,
                                                   round_scale=case.round_scale, use_ue8m0=case.ue8m0,
                                                   return_recv_hook=hook)
        if hk is not None:
            hk()
        out, _, hk = b.low_latency_combine(s["y"], s["idx"], s["w"], h, return_recv_hook=hook)
        if hk is not None:
            hk()
        return ll_parts(rx, cnt, h.src_info, h.layout_range), out, h.slot

    def _ll_eager(self, case, s: dict, hook: bool):
        """A dispatch + combine (with receive hooks or not): (parts, combined, dispatch slot)."""
        got = self._ll_dispatch(case, s, hook)
        self.t.calls += 2
        return got

    def _capture(self, case, s: dict) -> None:
        """The case's CUDA graph (dispatch + combine on its inputs), after two warm-up calls on
        the capture stream (collective: every rank captures at the same point)."""
        t = self.torch
        side = t.cuda.Stream()
        side.wait_stream(t.cuda.current_stream())
        with t.cuda.stream(side):
            for _ in range(2):
                call = self.t.calls
                self.prev_ll = [call, case.index, "capture warm-up", self._ll_eager(case, s, hook=False)[2]]
        t.cuda.synchronize()
        self.group.barrier()
        g = t.cuda.CUDAGraph()
        with t.cuda.graph(g, stream=side):
            s["graph_out"] = self._ll_dispatch(case, s, hook=False)
        t.cuda.synchronize()
        s["graph"] = g

    def _ll_call(self, case, kind: str, call: int) -> None:
        s, key = self.state[case.index], (case.index, "all")
        if kind == "graph":
            s["graph"].replay()
            self.t.calls += 2
            parts, out, slot = s["graph_out"]  # a replay runs the slot of its capture
        else:
            parts, out, slot = self._ll_eager(case, s, hook=kind == "hook")
        self._explain(self.t.repeat(key, self._hash(parts, out), call), call, case, kind, parts, out, slot)

    # ---- the run ---------------------------------------------------------------------------
    def sample(self) -> None:
        """Memory now (collective: every rank calls it at the same point).  Every rank is idle
        between calls, with the allocator's cached free blocks released, while the device's
        used memory is read: the ranks share the GPU, so another rank's temporaries (the
        hashes' int64 copies, up to a few GB) or its cache would otherwise count at random."""
        t = self.torch
        t.cuda.synchronize()
        t.cuda.empty_cache()
        self.group.barrier()
        free, total = t.cuda.mem_get_info()
        self.memory.append(dict(calls=self.t.calls, allocated=t.cuda.memory_allocated(),
                                reserved=t.cuda.memory_reserved(), device_used=total - free, rss=_rss_bytes()))
        self.group.barrier()

    def warm_up(self) -> None:
        """Every case once, checked against the reference; low-latency cases' graphs captured;
        then every case once more with each kind of call (hash-checked like the run's), so that
        whatever a kind allocates the first time (its outputs, the library's plans) is there
        before the first memory sample, from which the drift is measured."""
        from epcomm.tools import spawn
        for i, c in enumerate(self.cases):
            spawn.phase(f"warm-up: case {i} ({c.mode})")
            self._first(c)
            if c.mode == "ll":
                self._capture(c, self.state[c.index])
        for c in self.cases:
            for kind in dict.fromkeys(NORMAL_KINDS if c.mode == "normal" else LL_KINDS):
                spawn.phase(f"warm-up: case {c.index} {kind}")
                (self._normal_call if c.mode == "normal" else self._ll_call)(c, kind, self.t.calls)
        self.sample()
        self.warm_iters = len(self.cases)

    def run(self, calls: int, deadline: float, seed: int) -> None:
        from epcomm.tools import spawn
        for it, (c, kind) in enumerate(schedule(seed, self.cases)):
            if it % AGREE_EVERY == 0:
                stop = self.t.calls >= calls or time.time() > deadline
                if any(v == b"1" for v in self.group.allgather_bytes(b"1" if stop else b"0")):
                    break
                if it and it % SAMPLE_EVERY == 0:  # the same iteration on every rank
                    self.sample()
                    self.write_progress(complete=False)
            spawn.phase(f"call {self.t.calls}: case {c.index} {kind}")
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
            (self._normal_call if c.mode == "normal" else self._ll_call)(c, kind, self.t.calls)
        self.sample()

    def report(self, complete: bool, error: str = "") -> dict:
        after = self.memory  # sampled from the end of the warm-up on
        return dict(rank=self.rank, complete=complete, error=error, calls=self.t.calls,
                    verified_cases=self.t.verified, mismatches=len(self.t.mismatches),
                    mismatch_detail=self.t.mismatches[:50], mismatch_values=self.details,
                    hangs=int("EpcommTimeoutError" in error),
                    kinds=self.kinds, seconds=time.time() - self.start, memory=self.memory,
                    drift={k: drift([m[k] for m in after]) for k in ("allocated", "reserved", "device_used", "rss")})

    def write_progress(self, complete: bool, error: str = "") -> None:
        path = os.path.join(self.progress, f"rank{self.rank}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.report(complete, error), f)
        os.replace(path + ".tmp", path)


def _worker(rank, world, group, seed, n_cases, max_tokens, calls, deadline, progress):
    soak = Soak(rank, world, group, plan(seed, world, n_cases, max_tokens), progress, max_tokens)
    try:
        soak.warm_up()
        soak.write_progress(complete=False)
        soak.run(calls, deadline, seed)
    except Exception as e:  # counted and reported (a timeout is a hang), then raised
        soak.write_progress(complete=False, error=f"{type(e).__name__}: {e}")
        raise
    soak.write_progress(complete=True)
    soak.group.barrier()
    soak.buf.destroy()
    return soak.report(complete=True)


def summarize(ranks: list, args, complete: bool, error: str = "") -> dict:
    """The JSON of a run from the ranks' reports (partial ones when the run was cut).  ``calls``:
    the collective calls every rank made (the least of the ranks' counts; a rank that wrote no
    progress counts 0), to compare with ``target_calls``; ``passed`` and the conditions behind
    it: :func:`soak_check.verdict`."""
    from epcomm.tools.bench.knobs import GIT_COMMIT
    out = dict(
        tool="benchmarks/soak.py", commit=GIT_COMMIT.get() or "", complete=complete, error=error,
        ranks=args.ranks, seed=args.seed, cases=args.cases, target_calls=args.calls, time_limit_s=args.time_limit,
        calls=min((r.get("calls", 0) for r in ranks), default=0),
        calls_per_rank=[r.get("calls", 0) for r in ranks],
        mismatches=sum(r.get("mismatches", 0) for r in ranks),
        # a hang the kernels did not report: the spawn ended at its time limit
        hangs=sum(r.get("hangs", 0) for r in ranks) + int("did not finish within" in error),
        max_drift={k: max((abs(r["drift"][k]) for r in ranks if "drift" in r), default=0.0)
                   for k in ("allocated", "reserved", "device_used", "rss")})
    out.update(verdict(out["calls"], args.calls, out["mismatches"], out["hangs"], out["max_drift"], complete))
    out["per_rank"] = ranks
    return out


def limits(start: float, time_limit: float, now: float) -> tuple[float, float]:
    """(the ranks' deadline to stop calling, as a time.time(); the spawn's timeout in seconds
    from ``now``) for a run that began at ``start`` and must have written its JSON by
    ``start + time_limit``.  ValueError if too little of the limit is left to run anything."""
    timeout = start + time_limit - SPAWN_MARGIN_S - now
    if timeout < STOP_MARGIN_S:
        raise ValueError(f"--time-limit {time_limit:g}: {timeout:.0f} s left for the ranks, less than the "
                         f"{STOP_MARGIN_S:g} s they need to end")
    return start + time_limit - STOP_MARGIN_S, timeout


def _read_progress(d: str, n: int) -> list:
    out = []
    for r in range(n):
        try:
            with open(os.path.join(d, f"rank{r}.json")) as f:
                out.append(json.load(f))
        except (OSError, ValueError):
            out.append(dict(rank=r, complete=False, error="no progress written"))
    return out


def main(argv=None) -> int:
    start = time.time()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=10000, help="collective calls per rank to make")
    ap.add_argument("--ranks", type=int, default=2, help="ranks to spawn (sharing GPUs if more than there are)")
    ap.add_argument("--seed", type=int, default=1, help="the cases and the schedule derive from it")
    ap.add_argument("--cases", type=int, default=24, help="random cases (half per mode)")
    ap.add_argument("--max-tokens", type=int, default=4096, help="normal mode: most tokens per rank")
    ap.add_argument("--time-limit", type=float, default=540.0,
                    help="seconds for the whole run, warm-up included, from this script's start to its JSON written")
    ap.add_argument("--json", default="", help="write the results here (partial if the run is cut)")
    args = ap.parse_args(argv)
    from epcomm.tools import spawn
    env = {"EPCOMM_TIMEOUT_S": os.environ.get("EPCOMM_TIMEOUT_S", "60")}
    if args.ranks > max(spawn.gpu_count(), 1):
        env["EPCOMM_SHARE_GPU"] = "1"
    deadline, timeout = limits(start, args.time_limit, time.time())
    progress = tempfile.mkdtemp(prefix="epcomm-soak-")
    try:
        ranks = spawn.run(_worker, args.ranks, args.seed, args.cases, args.max_tokens, args.calls,
                          deadline, progress, timeout=timeout, env=env)
        out = summarize(ranks, args, complete=True)
    except Exception as e:  # a failed or cut run still reports what it did
        out = summarize(_read_progress(progress, args.ranks), args, complete=False, error=f"{type(e).__name__}: {e}")
    out["wall_s"] = time.time() - start
    text = json.dumps(out, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(json.dumps({k: v for k, v in out.items() if k != "per_rank"}, indent=1))
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
