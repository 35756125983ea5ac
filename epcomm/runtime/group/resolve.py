"""as_group and init_from_env: the Group for what the user holds, or for how it was launched."""
from __future__ import annotations

import sys
import types
from typing import Any

from epcomm import envs
from epcomm.runtime.group.files import FileGroup
from epcomm.runtime.group.jax import JaxGroup
from epcomm.runtime.group.mpi import MPIGroup
from epcomm.runtime.group.protocol import Group
from epcomm.runtime.group.torch import TorchGroup

_ACCEPTED = (
    "an object with rank, size, allgather_bytes, broadcast_bytes and barrier (returned as is); "
    "a torch.distributed ProcessGroup; None (the default torch.distributed group, when "
    "initialized); an mpi4py MPI.Intracomm; the string 'jax' or the jax.distributed module "
    "(JAX's distributed runtime, after jax.distributed.initialize)"
)


def _is_group(obj: Any) -> bool:
    return (isinstance(getattr(obj, "rank", None), int)
            and isinstance(getattr(obj, "size", None), int)
            and all(callable(getattr(obj, m, None))
                    for m in ("allgather_bytes", "broadcast_bytes", "barrier")))


def _torch_dist_initialized() -> bool:
    # Only a process that already imported torch can have initialized it; importing
    # torch just to learn "no" would cost seconds for JAX and MPI users.
    if "torch" not in sys.modules:
        return False
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available() and dist.is_initialized()


def _checked_group(obj: Any) -> Group:
    if obj.size < 1 or not 0 <= obj.rank < obj.size:
        raise ValueError(f"as_group: {type(obj).__name__} has rank {obj.rank} and size {obj.size}; "
                         f"a group needs size >= 1 and 0 <= rank < size")
    return obj


def _from_torch(obj: Any) -> Group | None:
    """A TorchGroup if ``obj`` is a torch.distributed ProcessGroup; None if it is no torch object."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist
    if not dist.is_available():
        return None
    if isinstance(obj, dist.ProcessGroup):
        return TorchGroup(obj)
    if (isinstance(obj, int) and obj == dist.GroupMember.NON_GROUP_MEMBER
            and dist.is_initialized()):
        raise ValueError("as_group: got torch.distributed.GroupMember.NON_GROUP_MEMBER; "
                         "this process is not a member of that group")
    return None


def _from_mpi(obj: Any) -> Group | None:
    """An MPIGroup if ``obj`` is an mpi4py intra-communicator; None if it is no communicator."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not isinstance(obj, mpi.Comm):
        return None
    if isinstance(obj, mpi.Intracomm):
        return MPIGroup(obj)
    raise TypeError(f"as_group: {type(obj).__name__} is an MPI communicator but not an "
                    f"intra-communicator; accepted: {_ACCEPTED}")


def as_group(obj: Any = None) -> Group:
    """Turn what the user holds into a :class:`Group`.

    Accepted: an object already satisfying :class:`Group` (returned as is); a
    torch.distributed ``ProcessGroup``; ``None`` for torch.distributed's default group;
    an mpi4py ``MPI.Intracomm``; the string ``"jax"`` or the ``jax.distributed`` module
    (or a JAX ``DistributedRuntimeClient``) for JAX's distributed runtime.

    Raises TypeError for anything else (the message lists what is accepted), and
    RuntimeError for ``None`` when torch.distributed is not initialized.
    """
    if obj is None:
        if _torch_dist_initialized():
            return TorchGroup(None)
        raise RuntimeError(
            "as_group(None) means torch.distributed's default group, but torch.distributed is "
            "not initialized; pass a group explicitly (" + _ACCEPTED + "), or use "
            "epcomm.runtime.group.init_from_env()")
    if _is_group(obj):
        return _checked_group(obj)
    if isinstance(obj, str):
        if obj == "jax":
            return JaxGroup()
        raise TypeError(f"as_group: unknown group name {obj!r}; accepted: {_ACCEPTED}")
    if isinstance(obj, types.ModuleType) and obj.__name__ == "jax.distributed":
        return JaxGroup()
    if type(obj).__name__ == "DistributedRuntimeClient":
        return JaxGroup(client=obj)
    group = _from_torch(obj) or _from_mpi(obj)
    if group is not None:
        return group
    missing = _missing_members(obj)
    if missing and len(missing) < len(_MEMBERS):
        # Most of the protocol is there: name what is not, rather than reciting it.
        raise TypeError(f"as_group: {type(obj).__name__} lacks {', '.join(missing)} of the group protocol "
                        f"(rank and size ints; allgather_bytes, broadcast_bytes and barrier methods)")
    raise TypeError(f"as_group: cannot make a group from {type(obj).__name__}; "
                    f"accepted: {_ACCEPTED}")


_MEMBERS = ("rank", "size", "allgather_bytes", "broadcast_bytes", "barrier")


def _missing_members(obj: Any) -> list[str]:
    """The members of the group protocol ``obj`` lacks (or has with the wrong kind)."""
    out = [f"{n} (an int)" for n in ("rank", "size") if not isinstance(getattr(obj, n, None), int)]
    return out + [f"{m}()" for m in _MEMBERS[2:] if not callable(getattr(obj, m, None))]


def init_from_env() -> Group:
    """Build the group this process was launched into.

    1. torch.distributed initialized -> :class:`TorchGroup` of the default group.
    2. Otherwise these environment variables, all three set -> :class:`FileGroup`:

       - ``EPCOMM_GROUP_DIR``: directory shared by all ranks on this host, unique to the job;
       - ``RANK``: this process's rank, ``0 <= RANK < WORLD_SIZE``;
       - ``WORLD_SIZE``: the number of processes.

    Raises RuntimeError when neither applies (naming what is missing), ValueError when
    ``RANK``/``WORLD_SIZE`` are not integers or are out of range.
    """
    if _torch_dist_initialized():
        return TorchGroup(None)
    names = ("EPCOMM_GROUP_DIR", "RANK", "WORLD_SIZE")
    vals = {n: envs.external(n) for n in names[1:]}
    vals["EPCOMM_GROUP_DIR"] = envs.GROUP_DIR.get()
    missing = [n for n in names if not vals[n]]
    if missing:
        raise RuntimeError(
            "init_from_env: torch.distributed is not initialized and "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; initialize "
            "torch.distributed, or set EPCOMM_GROUP_DIR, RANK and WORLD_SIZE, or build a group "
            "with epcomm.runtime.group.as_group(...)")
    try:
        rank, size = int(vals["RANK"]), int(vals["WORLD_SIZE"])
    except ValueError:
        raise ValueError(f"init_from_env: RANK={vals['RANK']!r} and WORLD_SIZE="
                         f"{vals['WORLD_SIZE']!r} must be integers") from None
    return FileGroup(vals["EPCOMM_GROUP_DIR"], rank, size)
