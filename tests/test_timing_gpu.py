"""The benchmark's wait kernels on one GPU: ``epcomm::spin_wait_ns`` waits the requested wall
time, neither less (the aligner must give every host time to queue its timed call) nor much
more (a wait that overran by a clock-dependent amount would bring back the start skew it
exists to remove); with a deadline stamped by ``epcomm::deadline_stamp`` it waits until that
%globaltimer value, and never longer than its cap."""
from __future__ import annotations

import pytest

from gpu_checks import world as _world

pytestmark = pytest.mark.gpu

needs_gpu = pytest.mark.skipif(_world() < 1, reason="needs an NVIDIA GPU (GPU test)")


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
    # Deadline mode: stamp now + lead, wait for it (cap far away); then a deadline 1 s ahead
    # with a 300 us cap.
    stamp = loader.load(spec, rank).fn("deadline_stamp")
    dl = torch.zeros(1, dtype=torch.int64, device="cuda")
    for lead_us, cap_us in ((700, 100_000), (1_000_000, 300)):
        sp, wp = SpinParams(), SpinParams()
        sp.ns, sp.deadline = lead_us * 1000, dl.data_ptr()
        wp.ns, wp.deadline = cap_us * 1000, dl.data_ptr()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        launch(stamp, 1, spec.threads, stream, sp)
        launch(fn, 1, spec.threads, stream, wp)
        b.record()
        b.synchronize()
        out[("deadline", lead_us, cap_us)] = (a.elapsed_time(b) * 1e3, None)
    return out


@needs_gpu
def test_benchmark_wait_kernel_waits_the_requested_wall_time():
    from epcomm import spawn
    res = spawn.run(_spin_worker, 1, timeout=120)[0]
    for key, (gpu_us, host_us) in res.items():
        if isinstance(key, tuple):  # deadline mode: the earlier of the deadline and the cap
            _, lead_us, cap_us = key
            us = min(lead_us, cap_us)
            assert us <= gpu_us < us + 500, (key, gpu_us)
            continue
        us = key
        assert us <= gpu_us < us + 500, (us, gpu_us)
        assert host_us >= us, (us, host_us)
