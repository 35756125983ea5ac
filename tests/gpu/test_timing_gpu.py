"""The benchmark's timing kernels. On one GPU: ``epcomm::spin_wait_ns`` waits the requested wall
time, neither less (the aligner must give every host time to queue its timed call) nor much
more (a wait that overran by a clock-dependent amount would bring back the start skew it
exists to remove).  On two GPUs: ``epcomm::start_barrier`` aligns them (every barrier aligned,
consistent clock offsets, no early exit) and gives up after its cap when a peer never comes."""
from __future__ import annotations

import pytest

from gpu_checks import needs_gpu, needs_gpus

pytestmark = pytest.mark.gpu


def _spin_worker(rank, world, group):
    import time

    import torch

    from epcomm.jit import loader
    from epcomm.jit.launch import launch
    from epcomm.kernels.timing import SpinParams, SpinWaitSpec
    torch.cuda.set_device(rank)
    torch.zeros(1, device="cuda")  # torch's context current on this thread
    spec = SpinWaitSpec()
    fn = loader.load(spec, rank).fn("spin_wait_ns")
    stream = torch.cuda.current_stream().cuda_stream
    out = {}
    for us in (200, 2000):
        p = SpinParams()
        p.ns = us * 1000
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        a.record()
        launch(fn, 1, spec.threads, stream, p)
        b.record()
        b.synchronize()
        # Events bracket the kernel on the GPU; the host clock checks the same wait against an
        # independent wall clock.
        out[us] = (a.elapsed_time(b) * 1e3, (time.perf_counter() - t0) * 1e6)
    return out


@needs_gpu
def test_benchmark_wait_kernel_waits_the_requested_wall_time():
    from epcomm.tools import spawn
    res = spawn.run(_spin_worker, 1, timeout=120)[0]
    for us, (gpu_us, host_us) in res.items():
        assert us <= gpu_us < us + 500, (us, gpu_us)
        assert host_us >= us, (us, host_us)


def _barrier_worker(rank, world, group):
    import torch

    from epcomm.tools.bench import _Aligner
    torch.cuda.set_device(rank)
    torch.zeros(1, device="cuda")
    al = _Aligner(torch, None, group, sleep_us=500.0)
    times = []
    for _ in range(6):
        al()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        al()  # timed: the barrier itself (500 us lead after the exchange)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    al()  # collects the last report
    out = {"times": times, "summary": al.summary()}
    # A peer that never comes: rank 0 alone, the barrier gives up after its cap.
    group.barrier()
    if rank == 0:
        al._p.cap_ns = 2_000_000
        al()
        torch.cuda.synchronize()
        out["alone"] = [int(v) for v in al.report.tolist()]
    group.barrier()
    al.close()
    return out


@needs_gpus
def test_start_barrier_aligns_two_gpus_and_gives_up_on_a_missing_peer():
    from epcomm.tools import spawn
    res = spawn.run(_barrier_worker, 2, timeout=180)
    for r, out in enumerate(res):
        s = out["summary"]
        assert s["barriers"] == 12 and s["aligned"] == 12, s
        assert 0 < s["round_trip_us"] < 100, s
        # Offsets measured by independent barriers agree: the clocks are compared, not guessed.
        assert s["clock_offset_spread_us"] < 20, s
        # Nobody leaves before the lead (500 us after the exchange; the bound above only catches a hang).
        assert all(450 <= t < 50_000 for t in out["times"]), (r, out["times"])
    assert res[0]["summary"]["clock_offset_us_vs_rank0"] == 0
    assert res[0]["alone"][2] == 0  # not aligned: the peer never answered
