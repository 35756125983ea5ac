"""A short fuzz on the GPU: spawned ranks (sharing one GPU under EPCOMM_SHARE_GPU=1) make the same
random sequence of calls on one Buffer with both modes.

Valid steps are random cases of benchmarks/soak_check.py (normal intranode dispatch + combine,
low-latency dispatch + combine; BF16 and FP8; up to 64 tokens per rank in the normal mode),
checked bit for bit against ``epcomm.reference`` with the soak's checks.  Invalid steps spoil one
argument the same way on every rank (an index out of range, a repeated expert in the
low-latency mode, a wrong dtype, a handle of the other mode's dispatch, more tokens than T in the
low-latency mode or top-k rows that are not x's in the normal mode, a flag that is not a bool):
each must raise TypeError/ValueError naming that argument on every rank, and the next valid step
proves nothing was left half done.  After ``destroy()`` a call raises BufferStateError.  (A
handle of another Buffer is left to the CPU fuzz, tests/cpu/test_fuzz_api.py: a second Buffer
here would cost a second NVSHMEM set-up.)  The sequence derives from EPCOMM_TEST_FUZZ_SEED
(default 1), so a failure repeats.  tests/cpu/test_fuzz_gpu_spoils.py runs the spoiled calls
on the CPU's fake runtime: each raises naming what ``_spoil`` says.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from epcomm.tools import spawn
from gpu_checks import TEST_FUZZ_SEED, TEST_TIMEOUT, assert_every_rank_ok, device_of, needs_ranks, normal_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]

BENCH = str(Path(__file__).resolve().parents[2] / "benchmarks")
STEPS = 24
SPOILS = ("bad_index", "dtype", "flag", "tokens", "handle")


def plan(rng, steps: int = STEPS) -> list:
    """(mode, spoil) of every step, the same on every rank: a valid step of each mode first (so
    a handle of the other mode exists), then each spoil once in each mode and valid steps of a
    random mode, in random order (a random choice per step left some spoils out of a seed)."""
    spoiled = [(m, k) for m in ("normal", "ll") for k in SPOILS]
    valid = [("normal" if rng.integers(2) else "ll", "none") for _ in range(steps - 2 - len(spoiled))]
    rest = spoiled + valid
    return [("normal", "none"), ("ll", "none")] + [rest[int(i)] for i in rng.permutation(len(rest))]


def _spoil(kind: str, s: dict, case, buf, other_handle):
    """(the call with ``kind`` spoiled, the names its error may give); ``other_handle``: a handle
    of the other mode's dispatch.  Every rank spoils its call alike (whatever its token count),
    so every rank raises."""
    import torch
    x, idx, w = s["x"], s["idx"], s["w"]
    if case.mode == "normal":
        def call(**kw):
            return buf.dispatch(**{**dict(x=x, topk_idx=idx, topk_weights=w, num_experts=case.E), **kw})
        spoils = {"bad_index": (lambda: call(topk_idx=torch.full_like(idx, case.E)), ("topk_idx",)),
                  "dtype": (lambda: call(topk_weights=w.double()), ("topk_weights",)),
                  "flag": (lambda: call(async_finish="no"), ("async_finish",)),
                  "tokens": (lambda: call(topk_idx=idx.new_full((idx.shape[0] + 1, case.K), -1)), ("topk_idx",)),
                  "handle": (lambda: buf.combine(s["y"], other_handle), ("handle",))}
    else:
        def call(**kw):
            return buf.low_latency_dispatch(**{**dict(x=x, topk_idx=idx, num_max_dispatch_tokens_per_rank=case.T,
                                                      num_experts=case.E, use_fp8=case.fp8), **kw})
        # a repeated expert (every slot expert 0), or with top-1 an index below -1
        bad = torch.zeros_like(idx) if case.K > 1 else torch.full_like(idx, -2)
        spoils = {"bad_index": (lambda: call(topk_idx=bad), ("topk_idx",)),
                  "dtype": (lambda: call(x=x.float()), ("x",)),
                  "flag": (lambda: call(use_fp8="yes"), ("use_fp8",)),
                  "tokens": (lambda: call(x=x.new_zeros((case.T + 1, case.H)),
                                          topk_idx=idx.new_full((case.T + 1, case.K), -1)),
                             ("x", "num_max_dispatch_tokens_per_rank")),
                  "handle": (lambda: buf.low_latency_combine(s["y"], idx, w, other_handle), ("handle",))}
    return spoils[kind]


def _valid(sc, buf, case, s, ref, rank):
    """One valid step: dispatch + combine, the soak's check against the reference."""
    if case.mode == "normal":
        res = buf.dispatch(s["x"], topk_idx=s["idx"], topk_weights=s["w"], num_experts=case.E,
                           num_worst_tokens=case.worst)
        comb = buf.combine(s["y"], res[4], topk_weights=res[2])
        return sc.verify_normal(sc.normal_parts(res, ref["dispatch"][rank].handle.num_recv_tokens), comb[:2],
                                ref, rank), res[4]
    rx, cnt, h, _, _ = buf.low_latency_dispatch(s["x"], s["idx"], case.T, case.E, use_fp8=case.fp8,
                                                round_scale=case.round_scale, use_ue8m0=case.ue8m0)
    out, _, _ = buf.low_latency_combine(s["y"], s["idx"], s["w"], h)
    return sc.verify_ll(sc.ll_parts(rx, cnt, h.src_info, h.layout_range), out, ref, rank), h


def _step_inputs(sc, case, world: int, rank: int, ll):
    inp = sc.case_inputs(case, world)
    if case.mode == "normal":
        ref = sc.normal_reference(case, world, inp)
    else:
        ref = sc.ll_reference(case, world, inp, partials=ll.partials and not ll.force_put)
    s = {"x": sc.to_torch(inp["xs"][rank]), "idx": sc.to_torch(inp["idx"][rank]),
         "w": sc.to_torch(inp["w"][rank]), "y": sc.to_torch(ref["y"][rank])}
    if inp["scales"] is not None:
        s["x"] = (s["x"], sc.to_torch(inp["scales"][rank], col_major=case.col_scales))
    return s, ref


def _worker(rank, world, group, seed, steps):
    import torch

    import epcomm
    from epcomm.errors import BufferStateError
    sys.path.insert(0, BENCH)
    import soak_check as sc
    torch.cuda.set_device(device_of(rank))
    buf = epcomm.Buffer(group, epcomm.Buffer.get_nvl_buffer_size_hint(7168, world, 64, 8),
                        epcomm.Buffer.get_low_latency_rdma_size_hint(256, 7168, world, 16 * world),
                        low_latency_mode=True)
    rng = np.random.default_rng(seed)
    out, handles = {}, {}
    for step, (mode, spoil) in enumerate(plan(rng, steps)):
        case = sc.make_case(rng, step, world, mode, max_tokens=64)
        spawn.phase(f"step {step}: {mode} {spoil}")
        s, ref = _step_inputs(sc, case, world, rank, buf._ll)
        name = f"step{step}-{mode}-{spoil}"
        other = handles.get("ll" if mode == "normal" else "normal")
        tokens = min(case.Ns)  # every rank decides alike: a rank that made the call valid would wait
        # Skipped where the spoiling is no error: no other handle yet, or a rank with no token.
        if spoil != "none" and not (spoil == "handle" and other is None) and not (spoil == "bad_index" and tokens == 0):
            call, blame = _spoil(spoil, s, case, buf, other)
            try:
                call()
                out[name] = "accepted"
                continue
            except (TypeError, ValueError) as e:
                if not any(b in str(e) for b in blame):
                    out[name] = f"{type(e).__name__} does not name {blame}: {e}"
        bad, h = _valid(sc, buf, case, s, ref, rank)
        handles[mode] = h
        out.setdefault(name, "ok" if not bad else f"differs from the reference: {bad}")
    torch.cuda.synchronize()
    group.barrier()
    buf.destroy()
    try:
        buf.dispatch(torch.zeros(1, 128, dtype=torch.bfloat16, device="cuda"), num_experts=world)
        out["after destroy"] = "accepted"
    except BufferStateError as e:
        out["after destroy"] = "ok" if "destroyed" in str(e) else str(e)
    return out


@needs_ranks
def test_random_valid_and_invalid_calls_against_the_reference():
    res = spawn.run(_worker, normal_ranks(), TEST_FUZZ_SEED.get(), STEPS, timeout=TEST_TIMEOUT.get())
    assert_every_rank_ok(res)
