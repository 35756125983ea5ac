"""Fault injection: a rank killed with SIGKILL (between calls, during a dispatch, during a combine,
during a low-latency receive hook), a rank that stalls for less than the shrink timeout, and a
rank that leaves cleanly; a death inside a normal-mode call with the NVLink buffer shared both
ways (EPCOMM_PEER_MEMORY=ipc and vmm).  Ranks share one GPU (EPCOMM_SHARE_GPU=1;
EPCOMM_TEST_RANKS=2, 4 or 8).

For each case the survivors record what their call raised or returned and how long it took
(printed, and in the results), then check that their next calls (masked in shrink mode, or on
a Buffer rebuilt on the survivors) equal epcomm.reference on the routing the dead rank leaves
(reference.mask_routing), bit for bit, and that a rebuilt Buffer leaves no thread or torch
memory behind.  The victim is the last rank (rank 1 in the low-latency "middle" case).  The
normal mode needs 2 ranks, so the rebuilt Buffer is made (and required) only with 3 ranks or
more: run with EPCOMM_TEST_RANKS=4 to cover it.  Each spawn is limited to FAULT_SPAWN_S (a
normal-mode spawn takes well under a minute), so a hang in one case leaves the step's time to
the others.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

from epcomm.tools import spawn
from gpu_checks import TEST_TIMEOUT, device_of, ll_ranks, needs_ranks, normal_ranks, random_job

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]

N, H, E, K, T = 128, 2048, 32, 4, 128
SHRINK_MS = 4000     # EPCOMM_SHRINK_TIMEOUT_MS once the kernels are compiled
TIMEOUT_S = 6        # EPCOMM_TIMEOUT_S of the cases without shrink
FAULT_SPAWN_S = min(TEST_TIMEOUT.get(), 240.0)   # one spawn's limit (see the module docstring)


def _job(world, seed, num_experts=E):
    return random_job(np.random.default_rng(seed), world, N, H, num_experts, K, drop_prob=0.1)


def _t(torch, a):
    if a.dtype == np.int64 or a.dtype == np.float32:
        return torch.from_numpy(a).cuda()
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).cuda()


def _bits(t):
    """The raw bits of a torch tensor in NumPy (2-byte dtypes as int16)."""
    import torch
    t = t.detach().cpu().contiguous()
    return t.view(torch.int16).numpy() if t.element_size() == 2 else t.numpy()


# ---- normal mode ---------------------------------------------------------------------------------
def _normal_round(buf, torch, job, rank, worst=0, num_experts=E):
    xs, tks, ws = job
    rx, rti, rtw, counts, handle, _ = buf.dispatch(_t(torch, xs[rank]), topk_idx=_t(torch, tks[rank]),
                                                   topk_weights=_t(torch, ws[rank]), num_experts=num_experts,
                                                   num_worst_tokens=worst)
    y, _, _ = buf.combine(rx, handle)
    torch.cuda.synchronize()
    return rx, rti, counts, y


def _normal_check(got, job, rank, masked=(), num_experts=E):
    from epcomm import reference
    xs, tks, ws = job
    tk = reference.mask_routing(tks, num_experts, masked) if masked else tks
    res = reference.dispatch(xs, num_experts, topk_idx=tk, topk_weights=ws)
    comb = reference.combine([r.recv_x for r in res], [r.handle for r in res])
    rx, rti, counts, y = got
    want = res[rank]
    bad = []
    if tuple(rx.shape) != want.recv_x.shape:
        return [f"recv_x shape {tuple(rx.shape)} != {want.recv_x.shape}"]
    if not np.array_equal(_bits(rx), want.recv_x.view(np.int16)):
        bad.append("recv_x")
    if not np.array_equal(rti.cpu().numpy(), want.recv_topk_idx):
        bad.append("recv_topk_idx")
    if list(counts) != list(want.num_recv_tokens_per_expert_list):
        bad.append(f"counts {list(counts)} != {want.num_recv_tokens_per_expert_list}")
    if not np.array_equal(_bits(y), comb[rank][0].view(np.int16)):
        bad.append("combined x")
    return bad


def _timed(out, call):
    """Run the survivors' first call after the fault: what it returned or raised and how long it
    took go into ``out``; returns its result (None if it raised)."""
    from epcomm.errors import EpcommError
    t0 = time.monotonic()
    got = None
    try:
        got = call()
        out["call"] = "returned"
    except EpcommError as e:
        out["call"] = f"{type(e).__name__}: peer={getattr(e, 'peer', None)}: {e}"
        out["peer"] = getattr(e, "peer", None)
    out["call_s"] = round(time.monotonic() - t0, 2)
    return got


def _survivor_combine(buf, torch, job, rank):
    """A dispatch every rank completes, then the combine the victim dies in."""
    xs, tks, ws = job
    rx, _, _, _, handle, _ = buf.dispatch(_t(torch, xs[rank]), topk_idx=_t(torch, tks[rank]),
                                          topk_weights=_t(torch, ws[rank]), num_experts=E)
    buf.combine(rx, handle)
    torch.cuda.synchronize()


def _rebuild(old, group, rank, world, victim, torch, epcomm):
    """Survivors: a group of their own, the old Buffer released with it, a smaller Buffer that
    must match the reference; then released too, with no thread or torch memory left over."""
    import threading

    from epcomm.runtime.group import FileGroup
    survivors = [r for r in range(world) if r != victim]
    me = survivors.index(rank)
    sub = FileGroup(os.path.join(os.path.dirname(group.path), "survivors"), me, len(survivors))
    t0 = time.monotonic()
    old.destroy(group=sub)
    out = {"destroy_s": round(time.monotonic() - t0, 2)}
    if len(survivors) < 2:
        return out  # the normal mode needs two ranks
    # What is left once the old Buffer is gone: the rebuilt ones must leave no more.
    torch.cuda.synchronize()
    threads, mem = threading.active_count(), torch.cuda.memory_allocated()
    size = epcomm.Buffer.get_nvl_buffer_size_hint(H, len(survivors), N, K)
    # The survivors keep their experts: E / world each, so an expert count the smaller group
    # divides (E itself need not be: 32 experts on 3 or 7 survivors).
    es = E // world * len(survivors)
    for i in range(2):  # twice: a leak would grow
        buf = epcomm.Buffer(sub, size)
        job = _job(len(survivors), 100 + i, es)
        out[f"rebuilt_{i}"] = _normal_check(_normal_round(buf, torch, job, me, num_experts=es), job, me,
                                            num_experts=es) or "ok"
        buf.destroy()
    torch.cuda.synchronize()
    out["leak"] = ("ok" if threading.active_count() <= threads and torch.cuda.memory_allocated() <= mem
                   else f"threads {threads}->{threading.active_count()}, torch memory {mem}->"
                        f"{torch.cuda.memory_allocated()}")
    return out


def _compile_survivors_kernels(world, device):
    """The survivors' Buffer (world - 1 ranks) runs kernels of another rank count, which
    `epcomm warmup --preset tests` (ranks 2, 4, 8) does not build: compile them now, before the
    short timeouts, not inside the rebuild (a rank compiling there for seconds would leave the
    others waiting in a kernel, beyond EPCOMM_TIMEOUT_S=6 in the case without shrink)."""
    if world - 1 < 2:
        return
    from epcomm.jit import loader
    from epcomm.kernels.intranode import IntranodeCombineSpec, IntranodeDispatchSpec
    for spec in (IntranodeDispatchSpec(world - 1, H, False), IntranodeCombineSpec(world - 1, H)):
        loader.load(spec, device)


def _normal_worker(rank, world, group, case, shrink):
    import torch

    import epcomm
    from epcomm.runtime.group import LocalGroup
    torch.cuda.set_device(device_of(rank))
    _compile_survivors_kernels(world, device_of(rank))
    os.environ["EPCOMM_SHRINK_TIMEOUT_MS"] = "600000"  # a cold JIT compile must not get a rank masked
    victim = world - 1
    buf = epcomm.Buffer(group, epcomm.Buffer.get_nvl_buffer_size_hint(H, world, N, K), enable_shrink=shrink)
    out = {}
    for i in range(2):  # compiles the kernels on every rank before the short timeouts apply
        job = _job(world, i)
        out[f"warm_{i}"] = _normal_check(_normal_round(buf, torch, job, rank), job, rank) or "ok"
    group.barrier()
    os.environ["EPCOMM_SHRINK_TIMEOUT_MS"] = str(SHRINK_MS)
    job = _job(world, 7)
    xs, tks, ws = job
    if rank == victim:
        if case == "stall":  # a quarter of the shrink timeout late
            time.sleep(SHRINK_MS / 4000)
            _normal_round(buf, torch, job, rank)
            buf.destroy()
            return {"victim": "stalled and finished"}
        if case == "dispatch":  # the kernels are queued when the process dies
            buf.dispatch(_t(torch, xs[rank]), topk_idx=_t(torch, tks[rank]), num_experts=E, num_worst_tokens=N * world)
        if case == "combine":  # the dispatch completes everywhere; the process dies in the combine
            rx, _, _, _, handle, _ = buf.dispatch(_t(torch, xs[rank]), topk_idx=_t(torch, tks[rank]),
                                                  topk_weights=_t(torch, ws[rank]), num_experts=E)
            torch.cuda.synchronize()  # this rank's dispatch is done: the survivors' completes
            # The combine is queued behind a ~1 s spin on the caller's stream, which it waits
            # for: it cannot finish in the moment before the process is gone (had it run, it
            # would have delivered this rank's rows and the survivors would mask nothing).
            torch.cuda._sleep(2_000_000_000)
            buf.combine(rx, handle)
        if case == "leave":
            group.barrier()  # the survivors know this rank leaves
            group.barrier()  # and have masked it
            buf.destroy(group=LocalGroup())
            return {"victim": "left"}
        spawn.die()
    # ---- survivors ----
    if case == "leave":
        group.barrier()
        buf.update_mask(victim)
        group.barrier()
    if case == "combine":
        got = _timed(out, lambda: _survivor_combine(buf, torch, job, rank))
    else:
        got = _timed(out, lambda: _normal_round(buf, torch, job, rank))
    if case == "stall":
        out["mask"] = buf.query_mask().tolist()
        out["after"] = _normal_check(got, job, rank) or "ok"
        buf.destroy()
        return out
    if shrink:
        out["mask"] = buf.query_mask().tolist()
        if case in ("between", "leave"):  # the dead rank was gone before the call began
            out["failing_call"] = _normal_check(got, job, rank, [victim]) or "ok"
        for i in range(2):
            job = _job(world, 20 + i)
            out[f"after_{i}"] = _normal_check(_normal_round(buf, torch, job, rank), job, rank, [victim]) or "ok"
    out.update(_rebuild(buf, group, rank, world, victim, torch, epcomm))
    return out


def _report(name, res, victim):
    for rank, r in enumerate(res):
        if rank != victim:
            print(f"fault {name}: rank {rank}: call {r.get('call')!r} in {r.get('call_s')} s, mask {r.get('mask')}, "
                  f"destroy {r.get('destroy_s')} s")


def _assert_ok(res, victim, keys_ok, required=()):
    """Every survivor's result under a key starting with one of ``keys_ok`` is "ok", and each
    key of ``required`` is there (a check that did not run is not a pass)."""
    for rank, r in enumerate(res):
        if rank == victim:
            continue
        missing = [k for k in required if k not in r]
        assert not missing, f"rank {rank}: {missing} not checked: {r}"
        for k, v in r.items():
            if k.startswith(keys_ok):
                assert v == "ok", f"rank {rank} {k}: {v}"


def _rebuilt_keys(world):
    """The results a survivors' rebuild must leave (none with 2 ranks: 1 survivor cannot run the
    normal mode)."""
    return ("rebuilt_0", "rebuilt_1", "leak") if world >= 3 else ()


@needs_ranks
@pytest.mark.parametrize("case,peer_memory", [("between", "ipc"), ("dispatch", "ipc"), ("combine", "ipc"),
                                              ("leave", "ipc"), ("dispatch", "vmm"), ("combine", "vmm")])
def test_shrink_normal_mode_survives_a_lost_rank(case, peer_memory):
    """peer_memory: EPCOMM_PEER_MEMORY. The deaths inside a call, where survivors may still write
    into the dead rank's NVLink buffer, run with both kinds of shared memory."""
    world = normal_ranks()
    victim = world - 1
    res = spawn.run(_normal_worker, world, case, True, timeout=FAULT_SPAWN_S, may_die=(victim,),
                    env={"EPCOMM_PEER_MEMORY": peer_memory})
    _report(f"normal/{case}/{peer_memory}", res, victim)
    required = ("warm_0", "warm_1", "after_0", "after_1") + (("failing_call",) if case in ("between", "leave") else ())
    _assert_ok(res, victim, ("warm", "after", "failing_call", "rebuilt", "leak"), required + _rebuilt_keys(world))
    want = [0] * world
    want[victim] = 1
    for rank, r in enumerate(res):
        if rank == victim:
            continue
        assert r["call"] == "returned", f"rank {rank}: {r['call']}"
        assert r["mask"] == want, f"rank {rank}: mask {r['mask']}"
        # a clean leave is masked before the call: no wait at all; a death costs one shrink timeout
        limit = 5.0 if case == "leave" else SHRINK_MS / 1000 * 3 + 5
        assert r["call_s"] < limit, f"rank {rank}: the call took {r['call_s']} s"


@needs_ranks
def test_shrink_does_not_mask_a_rank_that_stalls_less_than_the_timeout():
    world = normal_ranks()
    res = spawn.run(_normal_worker, world, "stall", True, timeout=FAULT_SPAWN_S)
    _report("normal/stall", res, world - 1)
    _assert_ok(res, world - 1, ("warm", "after"), ("warm_0", "warm_1", "after"))
    for rank, r in enumerate(res[:-1]):
        assert r["mask"] == [0] * world and r["call"] == "returned", f"rank {rank}: {r}"


@needs_ranks
def test_without_shrink_a_dead_rank_is_a_named_timeout_and_survivors_rebuild():
    world = normal_ranks()
    victim = world - 1
    res = spawn.run(_normal_worker, world, "between", False, timeout=FAULT_SPAWN_S, may_die=(victim,),
                    env={"EPCOMM_TIMEOUT_S": str(TIMEOUT_S)})
    _report("normal/no-shrink", res, victim)
    _assert_ok(res, victim, ("warm", "rebuilt", "leak"), ("warm_0", "warm_1") + _rebuilt_keys(world))
    for rank, r in enumerate(res[:-1]):
        assert r["call"].startswith("EpcommTimeoutError") and r["peer"] == victim, f"rank {rank}: {r['call']}"
        assert r["call_s"] < TIMEOUT_S + 10, f"rank {rank}: the timeout took {r['call_s']} s"


# ---- low-latency mode --------------------------------------------------------------------------
def _ll_round(buf, torch, job, rank, hook_only=False):
    xs, tks, ws = job
    rx, cnt, handle, _, hook = buf.low_latency_dispatch(_t(torch, xs[rank]), _t(torch, tks[rank]), T, E,
                                                        use_fp8=False, return_recv_hook=hook_only)
    if hook_only:
        return None
    y, _, _ = buf.low_latency_combine(rx, _t(torch, tks[rank]), _t(torch, ws[rank]), handle)
    torch.cuda.synchronize()
    return rx, cnt, y


def _ll_check(buf, got, job, rank, masked=()):
    from epcomm import reference
    xs, tks, ws = job
    tk = reference.mask_routing(tks, E, masked) if masked else tks
    ref = reference.low_latency_dispatch(xs, tk, T, E, use_fp8=False)
    partials = buf._ll.partials and not buf._ll.force_put
    comb = reference.low_latency_combine([r.recv_x for r in ref], tk, ws, [r.handle for r in ref],
                                         partials=partials)
    rx, cnt, y = got
    want = ref[rank]
    bad = []
    c = cnt.cpu().numpy()
    if not np.array_equal(c, want.recv_count):
        return [f"recv_count {c.tolist()} != {want.recv_count.tolist()}"]
    rxb = _bits(rx)
    for j in range(len(c)):
        if not np.array_equal(rxb[j, :c[j]], want.recv_x[j, :c[j]].view(np.int16)):
            bad.append(f"recv_x expert {j}")
    if not np.array_equal(_bits(y), comb[rank].view(np.int16)):
        bad.append("combined x")
    return bad


def _ll_victim(world, case):
    """The last rank, or with "middle" rank 1 of 3 or more: the sources after a masked one are
    placed after its (empty) slots in every expert's received rows, which a victim that is last
    does not show.  Not rank 0 (NVSHMEM's bootstrap root)."""
    return 1 if case == "middle" else world - 1


def _ll_worker(rank, world, group, case):
    import torch

    import epcomm
    torch.cuda.set_device(device_of(rank))
    os.environ["EPCOMM_SHRINK_TIMEOUT_MS"] = "600000"  # a cold JIT compile must not get a rank masked
    victim = _ll_victim(world, case)
    need = epcomm.Buffer.get_low_latency_rdma_size_hint(T, H, world, E)
    buf = epcomm.Buffer(group, 0, need, low_latency_mode=True, enable_shrink=True)
    out = {}
    for i in range(2):
        job = _job(world, i)
        out[f"warm_{i}"] = _ll_check(buf, _ll_round(buf, torch, job, rank), job, rank) or "ok"
    group.barrier()
    os.environ["EPCOMM_SHRINK_TIMEOUT_MS"] = str(SHRINK_MS)
    job = _job(world, 7)
    if rank == victim:
        if case == "hook":  # the send half ran; the process dies before its receive hook
            _ll_round(buf, torch, job, rank, hook_only=True)
            torch.cuda.synchronize()
        spawn.die()
    got = _timed(out, lambda: _ll_round(buf, torch, job, rank))
    out["mask"] = buf.query_mask().tolist()
    if case in ("between", "middle") and got is not None:
        out["failing_call"] = _ll_check(buf, got, job, rank, [victim]) or "ok"
    for i in range(2):
        job = _job(world, 20 + i)
        out[f"after_{i}"] = _ll_check(buf, _ll_round(buf, torch, job, rank), job, rank, [victim]) or "ok"
    # NVSHMEM cannot start again in this process with fewer PEs: the survivors go on masked, and
    # destroy() leaves the symmetric heap (its free would wait for the dead PE).
    from epcomm.runtime.group import FileGroup
    survivors = [r for r in range(world) if r != victim]
    sub = FileGroup(os.path.join(os.path.dirname(group.path), "survivors"), survivors.index(rank), len(survivors))
    t0 = time.monotonic()
    buf.destroy(group=sub)
    out["destroy_s"] = round(time.monotonic() - t0, 2)
    return out


@pytest.mark.skipif(ll_ranks() < 2, reason="needs 2 low-latency ranks (EPCOMM_SHARE_GPU=1 on one GPU)")
@pytest.mark.parametrize("case", ["between", "hook", "middle"])
def test_shrink_low_latency_survives_a_lost_rank(case):
    world = ll_ranks()
    if case == "middle" and world < 3:
        pytest.skip("a victim before the last rank other than rank 0 needs 3 or more ranks (EPCOMM_TEST_RANKS=4)")
    victim = _ll_victim(world, case)
    res = spawn.run(_ll_worker, world, case, timeout=FAULT_SPAWN_S, may_die=(victim,))
    _report(f"low_latency/{case}", res, victim)
    _assert_ok(res, victim, ("warm", "after", "failing_call"),
               ("warm_0", "warm_1", "after_0", "after_1") + (("failing_call",) if case != "hook" else ()))
    want = [0] * world
    want[victim] = 1
    for rank, r in enumerate(res):
        if rank == victim:
            continue
        assert r["call"] == "returned" and r["mask"] == want, f"rank {rank}: {r}"
        assert r["call_s"] < SHRINK_MS / 1000 * 3 + 5, f"rank {rank}: the call took {r['call_s']} s"
