"""The benchmark's wait kernel on one GPU: ``epcomm::spin_wait_ns`` waits the requested wall
time, neither less (the aligner must give every host time to queue its timed call) nor much
more (a wait that overran by a clock-dependent amount would bring back the start skew it
exists to remove)."""
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
    return out


@needs_gpu
def test_benchmark_wait_kernel_waits_the_requested_wall_time():
    from epcomm import spawn
    res = spawn.run(_spin_worker, 1, timeout=120)[0]
    for us, (gpu_us, host_us) in res.items():
        assert us <= gpu_us < us + 500, (us, gpu_us)
        assert host_us >= us, (us, host_us)
