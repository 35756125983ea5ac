"""NVSHMEM bootstrap and the symmetric heap, through nvshmem4py.

NVSHMEM is initialised once per process (one GPU per process; tests may share one), from epcomm's group abstraction
(rank 0's unique id is broadcast with ``Group.broadcast_bytes``), so JAX, CuPy and MPI users
need no torch.  NVLink multicast (NVLS) is disabled unless the caller set
``NVSHMEM_DISABLE_NVLS`` otherwise: epcomm never needs it, and on shared machines it can put the
GPUs of a host out of service.
"""
from __future__ import annotations

import contextlib
import pickle
import sys
import threading
import time

from epcomm import envs
from epcomm.errors import EpcommError, ToolchainError

_LOCK = threading.Lock()
_STATE: dict = {"initialized": False}


def _nv():
    try:
        import nvshmem.core as nv  # type: ignore
    except ImportError as e:
        raise ToolchainError(
            "nvshmem4py is not installed: the low-latency mode needs it (pip install 'epcomm[cu13]', "
            "which brings nvshmem4py-cu13 and nvidia-nvshmem-cu13)") from e
    return nv


@contextlib.contextmanager
def _stall_report(what: str, rank: int, size: int):
    """NVSHMEM's collectives (its bootstrap, a symmetric allocation) cannot be interrupted or
    bounded from here: if ``what`` is still running after EPCOMM_GROUP_TIMEOUT_S, say so on
    stderr, naming this rank and the phase, instead of waiting in silence."""
    timeout = float(envs.GROUP_TIMEOUT_S.get())
    t0 = time.monotonic()

    def report():
        print(f"epcomm: rank {rank} of {size}: {what} still waiting after {time.monotonic() - t0:.0f} s "
              f"(EPCOMM_GROUP_TIMEOUT_S={timeout:g}): a peer may have died or not reached the same call; "
              f"NVSHMEM cannot be interrupted, so this process stays blocked", file=sys.stderr, flush=True)

    timer = threading.Timer(timeout, report)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def default_symmetric_size(heap_bytes: int) -> int:
    """NVSHMEM_SYMMETRIC_SIZE that epcomm sets when it is unset: room for the requested buffer
    plus NVSHMEM's own bookkeeping."""
    return int(heap_bytes * 1.1) + (256 << 20)


def is_initialized() -> bool:
    return _STATE["initialized"]


def init(group, device_id: int, heap_bytes: int, shared_gpu: bool = False) -> None:
    """Initialise NVSHMEM on ``device_id`` for every rank of ``group`` (collective).

    ``heap_bytes`` sizes the symmetric heap (NVSHMEM_SYMMETRIC_SIZE) unless already set.
    ``shared_gpu``: some ranks share a GPU (EPCOMM_SHARE_GPU tests).  NVSHMEM then runs its
    limited multiple-PEs-per-GPU mode: point-to-point operations and barrier_all, which is all
    epcomm uses, but not NCCL (switched off here so NVSHMEM does not warn about it).
    Raises EpcommError if NVSHMEM was initialised before for another device or group size.
    """
    with _LOCK:
        if _STATE["initialized"]:
            if _STATE["device"] != device_id or _STATE["nranks"] != group.size:
                raise EpcommError(
                    f"NVSHMEM is already initialised in this process for device {_STATE['device']} and "
                    f"{_STATE['nranks']} ranks; one process drives one GPU")
            return
        envs.setdefault_external("NVSHMEM_DISABLE_NVLS", "1")
        if shared_gpu:
            envs.setdefault_external("NVSHMEM_DISABLE_NCCL", "1")
        want = default_symmetric_size(heap_bytes)
        envs.setdefault_external("NVSHMEM_SYMMETRIC_SIZE", str(want))
        nv = _nv()
        from cuda.core import Device
        dev = Device(device_id)
        dev.set_current()
        uid = nv.get_unique_id(empty=(group.rank != 0))
        blob = group.broadcast_bytes(pickle.dumps(uid) if group.rank == 0 else None, root=0)
        uid = pickle.loads(blob)
        with _stall_report("NVSHMEM initialisation (nvshmem.core.init)", group.rank, group.size):
            nv.init(device=dev, uid=uid, rank=group.rank, nranks=group.size, initializer_method="uid")
        _STATE.update(initialized=True, device=device_id, nranks=group.size, rank=group.rank)


def alloc(nbytes: int):
    """A symmetric buffer (collective).  Returns (buffer object, device pointer)."""
    nv = _nv()
    with _stall_report(f"the symmetric heap allocation of {int(nbytes)} bytes (collective)",
                       _STATE.get("rank", -1), _STATE.get("nranks", -1)):
        buf = nv.buffer(int(nbytes))
    return buf, int(buf.handle)


def peer_ptr(buf, pe: int) -> int:
    """Address of ``pe``'s copy of ``buf`` usable by plain loads/stores here, or 0 if ``pe`` is
    not reachable over NVLink/PCIe peer access (then kernels use NVSHMEM puts)."""
    nv = _nv()
    try:
        pb = nv.get_peer_buffer(buf, pe)
    except Exception:
        return 0
    if pb is None:
        return 0
    return int(pb.handle)


def free(buf) -> None:
    _nv().free(buf)


def barrier_all(stream) -> None:
    _nv().barrier_all(stream)


def finalize() -> None:
    with _LOCK:
        if _STATE["initialized"]:
            _nv().finalize()
            _STATE.update(initialized=False)
