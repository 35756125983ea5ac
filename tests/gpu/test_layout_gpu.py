"""get_dispatch_layout on the GPU against epcomm.reference (torch, CuPy and JAX in and out)."""
from __future__ import annotations

import numpy as np
import pytest

from epcomm.tools import spawn
from gpu_checks import needs_gpu

pytestmark = pytest.mark.gpu



SHAPES = [(1, 8, 2, 1), (2, 8, 2, 8), (100, 64, 8, 8), (4096, 256, 8, 8), (8192, 512, 64, 8), (777, 64, 16, 6),
          (3000, 288, 2, 16), (513, 96, 32, 3)]


def _layout_worker(rank, world, group, shapes, frameworks):
    import epcomm
    from epcomm import interop, reference
    from epcomm.testing import random_topk
    from epcomm.runtime import driver
    driver.set_device(0)
    out = {}
    for fw in frameworks:
        try:
            if fw == "torch":
                import torch
                torch.cuda.set_device(0)
            elif fw == "cupy":
                import cupy  # noqa: F401
            else:
                import jax  # noqa: F401
        except ImportError as e:
            out[fw] = f"SKIP: {e}"
            continue
        rng = np.random.default_rng(5)
        errs = []
        for N, E, R, K in shapes:
            spawn.phase(f"layout {fw} N={N} E={E} R={R}")
            topk = random_topk(rng, N, E, min(K, E), drop_prob=0.15)
            got = epcomm.get_dispatch_layout(interop.from_numpy(fw, topk, "cuda", 0), E, R)
            ref = reference.get_dispatch_layout(topk, E, R)
            g = [None if v is None else interop.to_numpy(v) for v in got]
            if not np.array_equal(g[0], ref.num_tokens_per_rank):
                errs.append(f"{(N, E, R)} num_tokens_per_rank")
            if not np.array_equal(g[2], ref.num_tokens_per_expert):
                errs.append(f"{(N, E, R)} num_tokens_per_expert")
            if not np.array_equal(g[3].astype(bool), ref.is_token_in_rank):
                errs.append(f"{(N, E, R)} is_token_in_rank")
            if (g[1] is None) != (ref.num_tokens_per_rdma_rank is None) or (
                    g[1] is not None and not np.array_equal(g[1], ref.num_tokens_per_rdma_rank)):
                errs.append(f"{(N, E, R)} num_tokens_per_rdma_rank")
            if fw != "cupy" and not type(got[0]).__module__.split(".")[0].startswith(fw):
                errs.append(f"output framework {type(got[0])}")
        # Bad input raises before any kernel runs.
        bad = np.zeros((4, 2), np.int64)
        bad[1, 1] = 64
        try:
            epcomm.get_dispatch_layout(interop.from_numpy(fw, bad, "cuda", 0), 64, 8)
            errs.append("index 64 with 64 experts was accepted")
        except ValueError as e:
            if "outside [-1, 64)" not in str(e):
                errs.append(f"bad message: {e}")
        try:
            epcomm.get_dispatch_layout(interop.from_numpy(fw, bad.astype(np.float32), "cuda", 0), 64, 8)
            errs.append("float32 topk_idx was accepted")
        except TypeError as e:
            if "topk_idx" not in str(e):
                errs.append(f"bad message: {e}")
        # int32 indices (JAX's default width) are accepted and widened.
        ok32 = random_topk(rng, 300, 64, 6, drop_prob=0.1)
        got = epcomm.get_dispatch_layout(interop.from_numpy(fw, ok32.astype(np.int32), "cuda", 0), 64, 8)
        if not np.array_equal(interop.to_numpy(got[2]), reference.get_dispatch_layout(ok32, 64, 8).num_tokens_per_expert):
            errs.append("int32 topk_idx gave wrong counts")
        if fw == "torch":
            # On an explicit stream that does not follow the current one: the kernel must still
            # see the widened copy made on the current stream (queued behind a long sleep here).
            side = torch.cuda.Stream()
            t32 = torch.from_numpy(ok32.astype(np.int32)).cuda()
            torch.cuda.synchronize()
            torch.cuda._sleep(200_000_000)
            from gpu_checks import env_var
            with env_var("EPCOMM_CHECK_INDICES", "0"):  # the host check would wait for the sleep
                got = epcomm.get_dispatch_layout(t32, 64, 8, stream=side.cuda_stream)
            side.synchronize()
            torch.cuda.synchronize()
            if not np.array_equal(interop.to_numpy(got[2]),
                                  reference.get_dispatch_layout(ok32, 64, 8).num_tokens_per_expert):
                errs.append("int32 topk_idx on an explicit stream gave wrong counts")
            # Outputs dropped at once while the kernel on `stream` is still queued (behind a
            # sleep): their memory must not go to a new tensor of the current stream, which the
            # kernel would then overwrite.
            t64 = torch.from_numpy(ok32).cuda()
            torch.cuda.synchronize()
            with torch.cuda.stream(side):
                torch.cuda._sleep(200_000_000)
            with env_var("EPCOMM_CHECK_INDICES", "0"):
                nte = epcomm.get_dispatch_layout(t64, 64, 8, stream=side.cuda_stream)[2]
            fresh = torch.full((300, 8), 7, dtype=torch.uint8, device="cuda")  # is_token_in_rank's size
            side.synchronize()
            torch.cuda.synchronize()
            if not bool((fresh == 7).all()):
                errs.append("a dropped output of get_dispatch_layout(stream=) was overwritten in a new tensor")
            if not np.array_equal(interop.to_numpy(nte), reference.get_dispatch_layout(ok32, 64, 8).num_tokens_per_expert):
                errs.append("int64 topk_idx on an explicit stream gave wrong counts")
        out[fw] = "ok" if not errs else "; ".join(errs)
    return out


@needs_gpu
@pytest.mark.parametrize("fw", ["torch", "cupy", "jax"])
def test_layout_matches_reference(fw):
    res = spawn.run(_layout_worker, 1, SHAPES, [fw], timeout=300,
                    env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})[0]
    if res[fw].startswith("SKIP"):
        pytest.skip(res[fw])
    assert res[fw] == "ok", res[fw]
