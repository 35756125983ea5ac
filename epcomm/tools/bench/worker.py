"""What every benchmark worker shares: the environment it is spawned with, its set-up (device,
seed, NCCL, start aligner), the normal mode's random inputs and the partial results it saves as
it goes."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np

from epcomm import envs
from epcomm.testing import random_topk
from epcomm.tools import spawn
from epcomm.tools.bench.aligner import Aligner, HostAligner
from epcomm.tools.bench.baselines import nccl_init
from epcomm.tools.bench.report import write_json

# The environment benchmark workers are spawned with (``spawn.run(..., env=WORKER_ENV)``): no
# host index checks, which synchronise the device on every call (the timed paths are the fast
# ones).  The workers record what they saw (:func:`env_seen`).
WORKER_ENV = {envs.CHECK_INDICES.name: "0"}


def env_seen() -> dict:
    """The EPCOMM_*, NVSHMEM_* and NCCL_* variables this process sees: recorded with the results,
    since they change what runs (a dump for the record, not a setting read: epcomm reads its own
    through epcomm.envs)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(("EPCOMM_", "NVSHMEM_", "NCCL_"))}


def worker_setup(rank, world, group, aligner: str = "clock", share_gpu: bool = False):
    """Device (GPU ``rank`` modulo the visible ones), seed, NCCL for the baselines and the start
    aligner (``aligner``: its mode, see :class:`~epcomm.tools.bench.aligner.Aligner`); returns
    ``(torch, dist, align)``.  ``share_gpu``: ranks share GPUs (EPCOMM_SHARE_GPU), so no NCCL
    (it refuses two ranks on one GPU): ``dist`` is None and ``align`` a
    :class:`~epcomm.tools.bench.aligner.HostAligner`.  Raises RuntimeError unless the host index
    checks are off (a worker spawned without :data:`WORKER_ENV` would time them)."""
    import torch
    if envs.CHECK_INDICES.get():
        raise RuntimeError(f"benchmark workers run with {envs.CHECK_INDICES.name}=0: spawn them with "
                           "env=epcomm.tools.bench.WORKER_ENV")
    torch.cuda.set_device(rank % max(torch.cuda.device_count(), 1))
    torch.manual_seed(1234 + rank)  # every rank's data differs, and a failed check can be replayed
    spawn.phase("setup")
    if share_gpu:
        return torch, None, HostAligner(torch, group)
    dist = nccl_init(torch, rank, world, group)
    return torch, dist, Aligner(torch, dist, group, mode=aligner)


def normal_inputs(torch, rank: int, N: int, H: int, K: int, E: int) -> SimpleNamespace:
    """This rank's random inputs of a normal-mode dispatch, on the current device: ``topk``
    int64 [N, K] (:func:`epcomm.testing.random_topk`, seeded by the rank), ``w`` float32 [N, K],
    ``x`` bf16 [N, H], ``xq`` its e4m3 values, ``xs`` float32 scales [N, H/128] in [0.5, 1.5),
    ``xs_col`` the same scales column-major (torch's generator: seeded by :func:`worker_setup`)."""
    rng = np.random.default_rng(1234 + rank)
    topk = torch.from_numpy(random_topk(rng, N, E, K)).cuda()
    w = torch.rand(N, K, device="cuda")
    x = torch.randn(N, H, device="cuda").to(torch.bfloat16)
    xs = torch.rand(N, H // 128, device="cuda") + 0.5
    # Column-major scales, as DeepGEMM wants them and recent DeepEP tests pass them (epcomm then
    # skips its speculative receive inside one node, buffer.py).
    return SimpleNamespace(topk=topk, w=w, x=x, xq=x.float().clamp(-448, 448).to(torch.float8_e4m3fn), xs=xs,
                           xs_col=xs.T.contiguous().T)


def finish(out: dict, prog: Progress, align, dist, buf) -> dict:
    """A worker's last step: record the aligner's summary in ``out``, save it, release the
    aligner, the NCCL group (if any) and the Buffer; returns ``out``."""
    out["aligner"] = align.summary()
    prog.save()
    align.close()
    if dist is not None:
        dist.destroy_process_group()
    buf.destroy()
    return out


class Progress:
    """:func:`spawn.phase` plus a copy of this rank's results so far, saved before every new
    section into ``args["partial_dir"]`` (when given), where the parent finds them if the spawn
    fails: a hang or an error then loses only the section it happened in."""

    def __init__(self, args: dict, mode: str, rank: int, out: dict):
        d = args.get("partial_dir")
        self.path = partial_path(d, mode, rank) if d else None
        self.out = out

    def __call__(self, name: str) -> None:
        self.save()
        spawn.phase(name)

    def save(self) -> None:
        if self.path is not None:
            write_json(self.out, self.path)


def partial_path(directory: str, mode: str, rank: int) -> str:
    """Where :class:`Progress` saves ``rank``'s partial results of ``mode`` in ``directory``."""
    return os.path.join(directory, f"{mode}.{rank}.json")


def read_partials(directory: str, mode: str, n: int) -> list:
    """The partial results the ``n`` ranks saved for ``mode`` (those that could be read)."""
    out = []
    for r in range(n):
        try:
            with open(partial_path(directory, mode, r)) as f:
                out.append(json.load(f))
        except (OSError, ValueError):
            pass
    return out
