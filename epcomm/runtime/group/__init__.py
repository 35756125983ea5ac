"""Process groups: how the N processes of one epcomm job exchange set-up bytes.

A communication buffer is created collectively by one process per GPU.  At set-up those
processes must exchange a few small byte strings (CUDA IPC handles, NVSHMEM unique ids,
sizes); afterwards all data moves through the GPUs, never through this layer.  So a
:class:`Group` offers only three collectives on ``bytes`` -- it is a bootstrap channel,
not a transport, and nothing here is tuned for volume.

Users arrive from PyTorch, JAX or plain MPI, so no framework is required: every adapter
imports its framework inside its own constructor or methods, and :func:`as_group` only
looks at frameworks that are already imported.

Contract shared by every group: all ranks call the same collectives in the same order
(as with any collective API); a rank that calls a different sequence gets undefined
results or a timeout.
"""
from __future__ import annotations

import base64
import itertools
import os
import sys
import tempfile
import time
import types
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Group", "as_group", "init_from_env",
    "TorchGroup", "MPIGroup", "JaxGroup", "FileGroup", "LocalGroup",
]


@runtime_checkable
class Group(Protocol):
    """What epcomm needs from a set of cooperating processes.

    ``rank`` is this process's index in ``[0, size)``; ``size`` is the number of processes.
    """

    rank: int
    size: int

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Return every rank's ``data``, indexed by rank (lengths may differ per rank)."""
        ...

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        """Return ``root``'s ``data`` on every rank (non-roots may pass ``None``)."""
        ...

    def barrier(self) -> None:
        """Return once every rank has entered the barrier."""
        ...


_ACCEPTED = (
    "an object with rank, size, allgather_bytes, broadcast_bytes and barrier (returned as is); "
    "a torch.distributed ProcessGroup; None (the default torch.distributed group, when "
    "initialized); an mpi4py MPI.Intracomm; the string 'jax' or the jax.distributed module "
    "(JAX's distributed runtime, after jax.distributed.initialize)"
)


# ---------------------------------------------------------------------------- helpers

def _as_bytes(data: Any, what: str) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"{what}: expected bytes, got {type(data).__name__}")


def _check_root(root: int, size: int) -> int:
    # bool is an int; a stray True would silently mean rank 1
    if isinstance(root, bool) or not isinstance(root, int):
        raise TypeError(f"broadcast root must be an int, got {type(root).__name__}")
    if not 0 <= root < size:
        raise ValueError(f"broadcast root {root} is out of range for a group of size {size}")
    return root


def _root_payload(data: bytes | None, rank: int, root: int) -> bytes | None:
    if rank != root:
        return None
    if data is None:
        raise ValueError(f"broadcast_bytes: rank {rank} is the root and must pass bytes, not None")
    return _as_bytes(data, "broadcast_bytes")


def _timeout_s(timeout_s: float | None) -> float:
    if timeout_s is not None:
        return float(timeout_s)
    from epcomm import envs
    return float(envs.GROUP_TIMEOUT_S.get())


def _timeout_error(rank: int, phase: str, missing: list[int], timeout_s: float,
                   extra: str = "") -> Exception:
    from epcomm.errors import EpcommTimeoutError
    msg = (f"rank {rank}: timed out after {timeout_s:g} s in {phase}; "
           f"ranks that did not arrive: {missing}")
    if extra:
        msg += f" ({extra})"
    return EpcommTimeoutError(msg, rank=rank, phase=phase, peer=missing[0] if missing else -1)


def _delete_keys_before(own_keys: list[tuple[int, str]], seq: int, delete) -> list[tuple[int, str]]:
    """Delete this rank's keys of rounds before ``seq`` with ``delete(key)``; return the rest.

    Called once a collective that every rank writes into (allgather) or enters (barrier) at
    round ``seq`` completed: that proves every rank finished reading all earlier rounds.
    """
    keep = []
    for s, key in own_keys:
        if s < seq:
            try:
                delete(key)
            except Exception:
                pass  # best effort: a leftover key only costs the store's memory
        else:
            keep.append((s, key))
    return keep


def _is_group(obj: Any) -> bool:
    return (isinstance(getattr(obj, "rank", None), int)
            and isinstance(getattr(obj, "size", None), int)
            and all(callable(getattr(obj, m, None))
                    for m in ("allgather_bytes", "broadcast_bytes", "barrier")))


# ---------------------------------------------------------------------------- LocalGroup

class LocalGroup:
    """The group of one process (rank 0, size 1): every collective returns immediately."""

    rank = 0
    size = 1

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Return ``[data]``.  Raises TypeError if ``data`` is not bytes-like."""
        return [_as_bytes(data, "allgather_bytes")]

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        """Return ``data``.  Raises ValueError if ``root != 0`` or ``data`` is None."""
        _check_root(root, 1)
        return _root_payload(data, 0, root)  # type: ignore[return-value]

    def barrier(self) -> None:
        """Return at once."""

    def __repr__(self) -> str:
        return "LocalGroup()"


# ---------------------------------------------------------------------------- TorchGroup

_TORCH_GROUPS: dict = {}  # global ranks of a group -> TorchGroups made for them in this process


class TorchGroup:
    """A torch.distributed process group (any backend: gloo, nccl, ...).

    ``pg=None`` means the default group.  The bytes travel through the job's store (the
    TCPStore or FileStore that ``init_process_group`` set up), not through the backend: no
    communicator is created for them, no GPU is involved, and every wait is bounded by
    ``timeout_s`` (default ``EPCOMM_GROUP_TIMEOUT_S``): a rank that never arrives makes the others
    raise EpcommTimeoutError naming it, instead of waiting for torch's process-group timeout
    (10 to 30 minutes; NCCL's watchdog may abort the process instead).  Keys are
    ``epcomm/torch/<group>/<n>/<round>/<rank>``, ``<n>`` counting the TorchGroups of the same
    ranks used in this process (taken at the first collective; ranks use them in the same
    order, as they create Buffers collectively); each rank deletes its keys once every rank
    has read them.  Where torch offers no usable default store (a private torch API; the MPI
    backend's placeholder), the object collectives are used, bounded by torch's own timeout.
    A store that fails (its host exited) raises EpcommError saying so.

    Raises RuntimeError if torch.distributed is not initialized, ValueError if this
    process is not a member of ``pg``.
    """

    def __init__(self, pg: Any = None, timeout_s: float | None = None):
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("TorchGroup: torch.distributed is not initialized "
                               "(call torch.distributed.init_process_group first)")
        if pg is dist.GroupMember.NON_GROUP_MEMBER:
            raise ValueError("TorchGroup: this process is not a member of the given group "
                             "(torch.distributed.new_group returned NON_GROUP_MEMBER here)")
        self.pg = pg
        self.rank = dist.get_rank(pg)
        self.size = dist.get_world_size(pg)
        if self.rank < 0:
            raise ValueError("TorchGroup: this process is not a member of the given group")
        self.timeout_s = timeout_s
        self._store = None
        self._seq = 0
        self._own_keys: list[tuple[int, str]] = []
        try:
            from torch.distributed import distributed_c10d as c10d
            store = c10d._get_default_store()
            if pg is None or pg is dist.GroupMember.WORLD:
                ranks = tuple(range(dist.get_world_size()))
            else:
                ranks = tuple(int(r) for r in dist.get_process_group_ranks(pg))
            # A real call, not hasattr: the MPI backend's placeholder store has every method
            # and implements none.
            store.check(["epcomm/torch/probe"])
        except Exception:
            return  # the object collectives
        import hashlib
        self._ranks = ranks
        self._tag = hashlib.sha1(",".join(map(str, ranks)).encode()).hexdigest()[:12]
        self._store = store
        self.prefix: str | None = None  # taken at the first collective (_next)

    # ---- through the store ----
    def _key(self, seq: int, rank: int) -> str:
        return f"{self.prefix}/{seq}/{rank}"

    def _publish(self, seq: int, data: bytes) -> None:
        key = self._key(seq, self.rank)
        try:
            self._store.set(key, data)
        except Exception as e:
            from epcomm.errors import EpcommError
            raise EpcommError(f"rank {self.rank}: torch.distributed's store failed in round {seq} "
                              f"({type(e).__name__}: {e}); is the process that hosts it (rank 0 of the "
                              "job) still running?") from e
        self._own_keys.append((seq, key))

    def _wait(self, seq: int, ranks: list[int], phase: str) -> list[bytes]:
        import datetime

        from epcomm.errors import EpcommError
        timeout = _timeout_s(self.timeout_s)
        keys = [self._key(seq, r) for r in ranks]
        t0 = time.monotonic()
        try:
            self._store.wait(keys, datetime.timedelta(seconds=timeout))
            return [bytes(self._store.get(k)) for k in keys]
        except Exception as e:  # DistStoreError / RuntimeError, by torch version
            cause = f"{type(e).__name__}: {e}"
            if time.monotonic() - t0 < 0.9 * timeout:
                # not the wait's timeout: the store itself failed (its host, rank 0 of the
                # job, exited; a network error)
                raise EpcommError(f"rank {self.rank}: torch.distributed's store failed in {phase} ({cause}); "
                                  "is the process that hosts it (rank 0 of the job) still running?") from e
            missing = []
            for r, k in zip(ranks, keys):
                if r == self.rank:
                    continue
                try:
                    if not self._store.check([k]):
                        missing.append(r)
                except Exception:
                    missing.append(r)
            raise _timeout_error(self.rank, phase, missing, timeout, cause) from e

    def _collect_garbage(self, seq: int) -> None:
        self._own_keys = _delete_keys_before(self._own_keys, seq, self._store.delete_key)

    def _next(self) -> int:
        if self._store is not None and self.prefix is None:
            # The n-th TorchGroup of these ranks *used* in this process: counted at the first
            # collective, so a group made and never used (e.g. as_group(None) to print it) on
            # one rank does not shift the keys of the next Buffer.
            n = _TORCH_GROUPS.get(self._ranks, 0)
            _TORCH_GROUPS[self._ranks] = n + 1
            self.prefix = f"epcomm/torch/{self._tag}/{n}"
        seq = self._seq
        self._seq += 1
        return seq

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Return every rank's ``data``, indexed by group rank.

        Raises EpcommTimeoutError if some rank does not contribute within the timeout.
        """
        data = _as_bytes(data, "allgather_bytes")
        if self._store is None:
            import torch.distributed as dist
            out: list[Any] = [None] * self.size
            dist.all_gather_object(out, data, group=self.pg)
            return [bytes(b) for b in out]
        seq = self._next()
        self._publish(seq, data)
        out_b = self._wait(seq, list(range(self.size)), f"group allgather round {seq}")
        self._collect_garbage(seq)
        return out_b

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        """Return ``data`` of group rank ``root`` on every rank.

        Raises EpcommTimeoutError on a non-root if the root does not publish in time.
        """
        _check_root(root, self.size)
        payload = _root_payload(data, self.rank, root)
        if self._store is None:
            import torch.distributed as dist
            box = [payload]
            # object collectives take the *global* rank as src
            if self.pg is None or self.pg is dist.GroupMember.WORLD:
                src = root
            else:
                src = dist.get_global_rank(self.pg, root)
            dist.broadcast_object_list(box, src=src, group=self.pg)
            return bytes(box[0])
        seq = self._next()
        if payload is not None:
            self._publish(seq, payload)
            return payload
        return self._wait(seq, [root], f"group broadcast round {seq} from rank {root}")[0]

    def barrier(self) -> None:
        """Return once every rank of the group has entered the barrier.

        Raises EpcommTimeoutError naming the ranks that did not arrive within the timeout.
        """
        if self._store is None:
            import torch.distributed as dist
            dist.barrier(group=self.pg)
            return
        seq = self._next()
        self._publish(seq, b"")
        self._wait(seq, list(range(self.size)), f"group barrier round {seq}")
        self._collect_garbage(seq)

    def __repr__(self) -> str:
        how = "store" if self._store is not None else "object collectives"
        return f"TorchGroup(rank={self.rank}, size={self.size}, {how})"


# ---------------------------------------------------------------------------- MPIGroup

class MPIGroup:
    """An mpi4py intra-communicator.  Collectives block as the underlying MPI calls do."""

    def __init__(self, comm: Any):
        self.comm = comm
        self.rank = int(comm.Get_rank())
        self.size = int(comm.Get_size())

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Return every rank's ``data``, indexed by rank in ``comm``."""
        return [bytes(b) for b in self.comm.allgather(_as_bytes(data, "allgather_bytes"))]

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        """Return ``data`` of rank ``root`` on every rank."""
        _check_root(root, self.size)
        return bytes(self.comm.bcast(_root_payload(data, self.rank, root), root=root))

    def barrier(self) -> None:
        """Return once every rank of ``comm`` has entered the barrier."""
        self.comm.Barrier()

    def __repr__(self) -> str:
        return f"MPIGroup(rank={self.rank}, size={self.size})"


# ---------------------------------------------------------------------------- JaxGroup

_JAX_GROUPS = itertools.count()


class JaxGroup:
    """All processes of JAX's distributed runtime, talking through its key-value store.

    Needs ``jax.distributed.initialize(...)`` first (or an explicit ``client``, a
    ``DistributedRuntimeClient``).  ``rank = jax.process_index()``, ``size =
    jax.process_count()``.  Keys are ``f"{prefix}/{seq}/{rank}"`` with ``seq`` counting
    this group's collectives, so two groups alive at once in one job must use different
    ``prefix`` values.  Waits are bounded by ``timeout_s`` (default ``EPCOMM_GROUP_TIMEOUT_S``);
    on expiry EpcommTimeoutError is raised naming the ranks that did not arrive.

    Raises RuntimeError if the distributed runtime is not initialized.
    """

    def __init__(self, client: Any = None, prefix: str | None = None, timeout_s: float | None = None):
        import jax
        if client is None:
            from jax._src import distributed
            client = distributed.global_state.client
            if client is None:
                raise RuntimeError("JaxGroup: JAX's distributed runtime is not initialized "
                                   "(call jax.distributed.initialize first)")
        self.client = client
        # Each group of a process gets its own key space ("epcomm/<n>": the n-th JaxGroup used
        # here; ranks use them in the same order, as they create Buffers collectively), so a
        # normal-mode and a low-latency Buffer of one job do not collide in the key-value store.
        # Taken at the first collective: a group made and never used on one rank shifts nothing.
        self.prefix: str | None = prefix
        self.timeout_s = timeout_s
        self.rank = int(jax.process_index())
        self.size = int(jax.process_count())
        self._seq = 0
        # own keys not yet deleted, as (seq, key)
        self._own_keys: list[tuple[int, str]] = []
        # older jaxlibs only store str values; base64 keeps bytes intact through them
        self._raw = (hasattr(client, "key_value_set_bytes")
                     and hasattr(client, "blocking_key_value_get_bytes"))

    def _set(self, key: str, value: bytes) -> None:
        if self._raw:
            self.client.key_value_set_bytes(key, value)
        else:
            self.client.key_value_set(key, base64.b64encode(value).decode("ascii"))

    def _get(self, key: str, timeout_ms: int) -> bytes:
        if self._raw:
            return bytes(self.client.blocking_key_value_get_bytes(key, timeout_ms))
        return base64.b64decode(self.client.blocking_key_value_get(key, timeout_ms))

    def _present(self, key: str) -> bool:
        # only used to name the missing ranks after a timeout
        try:
            if hasattr(self.client, "key_value_try_get_bytes"):
                self.client.key_value_try_get_bytes(key)
            else:
                self.client.key_value_try_get(key)
            return True
        except Exception:
            return False

    def _next(self) -> int:
        if self.prefix is None:
            self.prefix = f"epcomm/{next(_JAX_GROUPS)}"
        seq = self._seq
        self._seq += 1
        return seq

    def _wait(self, seq: int, ranks: list[int], phase: str) -> list[bytes]:
        timeout = _timeout_s(self.timeout_s)
        deadline = time.monotonic() + timeout
        out: list[bytes] = []
        for i, r in enumerate(ranks):
            ms = max(1, int((deadline - time.monotonic()) * 1000))
            try:
                out.append(self._get(f"{self.prefix}/{seq}/{r}", ms))
            except Exception as e:
                # the runtime's error type differs across jaxlib versions; a dead
                # coordinator also lands here, and the chained cause says so
                missing = [q for q in ranks[i:]
                           if not self._present(f"{self.prefix}/{seq}/{q}")]
                raise _timeout_error(self.rank, phase, missing or ranks[i:i + 1], timeout,
                                     f"{type(e).__name__}: {e}") from e
        return out

    def _collect_garbage(self, seq: int) -> None:
        self._own_keys = _delete_keys_before(self._own_keys, seq, self.client.key_value_delete)

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Return every rank's ``data``, indexed by process index.

        Raises EpcommTimeoutError if some rank does not contribute within the timeout.
        """
        data = _as_bytes(data, "allgather_bytes")
        seq = self._next()
        key = f"{self.prefix}/{seq}/{self.rank}"
        self._set(key, data)
        self._own_keys.append((seq, key))
        out = self._wait(seq, list(range(self.size)), f"group allgather round {seq}")
        self._collect_garbage(seq)
        return out

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        """Return ``data`` of rank ``root`` on every rank.

        Raises EpcommTimeoutError on a non-root if the root does not publish in time.
        """
        _check_root(root, self.size)
        payload = _root_payload(data, self.rank, root)
        seq = self._next()
        if payload is not None:
            key = f"{self.prefix}/{seq}/{root}"
            self._set(key, payload)
            self._own_keys.append((seq, key))
            return payload
        return self._wait(seq, [root], f"group broadcast round {seq} from rank {root}")[0]

    def barrier(self) -> None:
        """Return once every process has entered the barrier.

        Raises EpcommTimeoutError if that does not happen within the timeout.
        """
        seq = self._next()
        timeout = _timeout_s(self.timeout_s)
        phase = f"group barrier round {seq}"
        try:
            self.client.wait_at_barrier(f"{self.prefix}/barrier/{seq}", int(timeout * 1000))
        except Exception as e:
            # the coordinator does not tell us who is missing; name nobody rather than guess
            raise _timeout_error(self.rank, phase, [], timeout,
                                 f"{type(e).__name__}: {e}") from e
        self._collect_garbage(seq)

    def __repr__(self) -> str:
        return f"JaxGroup(rank={self.rank}, size={self.size}, prefix={self.prefix!r})"


# ---------------------------------------------------------------------------- FileGroup

class FileGroup:
    """Single-host bootstrap through a shared directory, for jobs with no framework.

    Round ``seq`` (one per collective call) lives in ``path/<seq>/``; each writer
    publishes ``<rank>.bin`` atomically (temporary file + ``os.replace``), and readers poll
    for the files they need, sleeping 1 ms at first and up to 50 ms.  ``path`` must be
    unique to this job: files left by an earlier job would be read as this job's data
    (the constructor refuses a directory that already holds a file of this rank).

    Every wait is bounded by ``timeout_s`` (default ``EPCOMM_GROUP_TIMEOUT_S``); on expiry
    :class:`~epcomm.errors.EpcommTimeoutError` names this rank, the phase (e.g.
    ``"group allgather round 3"``) and the ranks that did not arrive.
    """

    _MIN_SLEEP = 0.001
    _MAX_SLEEP = 0.05

    def __init__(self, path: str | os.PathLike, rank: int, size: int,
                 timeout_s: float | None = None):
        from epcomm.validate import check_int
        size = check_int("FileGroup size", size)
        rank = check_int("FileGroup rank", rank)
        if size < 1:
            raise ValueError(f"FileGroup: size must be >= 1, got {size}")
        if not 0 <= rank < size:
            raise ValueError(f"FileGroup: rank {rank} is out of range for size {size}")
        self.path = os.fspath(path)
        self.rank = rank
        self.size = size
        self.timeout_s = timeout_s
        self._seq = 0
        self._own_files: list[tuple[int, str]] = []
        os.makedirs(self.path, exist_ok=True)
        stale = self._find_own_files()
        if stale:
            raise ValueError(f"FileGroup: {self.path} already holds files of rank {self.rank} "
                             f"(e.g. {stale[0]}), left by an earlier job; use a fresh directory")
        # Claim the rank: a second job (or a rerun, or a crashed earlier job's leftovers) in the
        # same directory would otherwise mix its rounds with ours.  Every rank claims before
        # its first collective, so some rank of a second job always refuses here.
        try:
            os.close(os.open(self._claim(self.rank), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            raise ValueError(f"FileGroup: rank {self.rank} of {self.path} is already taken by another job "
                             f"(or an earlier one); use a fresh directory per job") from None

    def _claim(self, rank: int) -> str:
        return os.path.join(self.path, f".rank{rank}.claim")

    def _find_own_files(self) -> list[str]:
        found = []
        with os.scandir(self.path) as it:
            for entry in it:
                f = os.path.join(entry.path, f"{self.rank}.bin")
                if entry.is_dir() and os.path.exists(f):
                    found.append(f)
        return found

    def _round_dir(self, seq: int) -> str:
        return os.path.join(self.path, str(seq))

    def _publish(self, seq: int, data: bytes) -> None:
        d = self._round_dir(seq)
        os.makedirs(d, exist_ok=True)
        # a dot-name never matches "<rank>.bin", so readers cannot see a half-written file
        fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{self.rank}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            final = os.path.join(d, f"{self.rank}.bin")
            os.replace(tmp, final)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._own_files.append((seq, final))

    def _wait(self, seq: int, ranks: list[int], phase: str) -> dict[int, bytes]:
        timeout = _timeout_s(self.timeout_s)
        deadline = time.monotonic() + timeout
        d = self._round_dir(seq)
        got: dict[int, bytes] = {}
        pending = list(ranks)
        sleep = self._MIN_SLEEP
        while True:
            still = []
            for r in pending:
                try:
                    with open(os.path.join(d, f"{r}.bin"), "rb") as f:
                        got[r] = f.read()
                except FileNotFoundError:
                    still.append(r)
            pending = still
            if not pending:
                return got
            now = time.monotonic()
            if now >= deadline:
                raise _timeout_error(self.rank, phase, pending, timeout, f"directory {d}")
            time.sleep(min(sleep, deadline - now))
            sleep = min(sleep * 1.5, self._MAX_SLEEP)

    def _collect_garbage(self, seq: int) -> None:
        # Finishing allgather round `seq` means every rank has written round `seq`, hence
        # finished reading every earlier round.  (Finishing a broadcast proves nothing
        # about the other ranks, so it never triggers clean-up.)
        keep = []
        for s, f in self._own_files:
            if s < seq:
                try:
                    os.unlink(f)
                except FileNotFoundError:
                    pass
                try:
                    # succeeds only for whichever rank removes the last file
                    os.rmdir(os.path.dirname(f))
                except OSError:
                    pass
            else:
                keep.append((s, f))
        self._own_files = keep

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Return every rank's ``data``, indexed by rank.

        Raises EpcommTimeoutError if some rank does not contribute within the timeout.
        """
        data = _as_bytes(data, "allgather_bytes")
        seq = self._seq
        self._seq += 1
        self._publish(seq, data)
        got = self._wait(seq, list(range(self.size)), f"group allgather round {seq}")
        self._collect_garbage(seq)
        return [got[r] for r in range(self.size)]

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        """Return ``data`` of rank ``root`` on every rank.

        Raises EpcommTimeoutError on a non-root if the root does not publish in time.
        """
        _check_root(root, self.size)
        payload = _root_payload(data, self.rank, root)
        seq = self._seq
        self._seq += 1
        if payload is not None:
            self._publish(seq, payload)
            return payload
        return self._wait(seq, [root], f"group broadcast round {seq} from rank {root}")[root]

    def barrier(self) -> None:
        """Return once every rank has entered the barrier (an allgather of empty strings).

        Raises EpcommTimeoutError naming the missing ranks; the phase reads "group allgather
        round N" because the barrier is that allgather.
        """
        self.allgather_bytes(b"")

    def __repr__(self) -> str:
        return f"FileGroup({self.path!r}, rank={self.rank}, size={self.size})"


# ---------------------------------------------------------------------------- factories

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
        if obj.size < 1 or not 0 <= obj.rank < obj.size:
            raise ValueError(f"as_group: {type(obj).__name__} has rank {obj.rank} and size {obj.size}; "
                             f"a group needs size >= 1 and 0 <= rank < size")
        return obj
    if isinstance(obj, str):
        if obj == "jax":
            return JaxGroup()
        raise TypeError(f"as_group: unknown group name {obj!r}; accepted: {_ACCEPTED}")
    if isinstance(obj, types.ModuleType) and obj.__name__ == "jax.distributed":
        return JaxGroup()
    if type(obj).__name__ == "DistributedRuntimeClient":
        return JaxGroup(client=obj)
    if "torch" in sys.modules:
        import torch.distributed as dist
        if dist.is_available():
            if isinstance(obj, dist.ProcessGroup):
                return TorchGroup(obj)
            if (isinstance(obj, int) and obj == dist.GroupMember.NON_GROUP_MEMBER
                    and dist.is_initialized()):
                raise ValueError("as_group: got torch.distributed.GroupMember.NON_GROUP_MEMBER; "
                                 "this process is not a member of that group")
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and isinstance(obj, mpi.Comm):
        if isinstance(obj, mpi.Intracomm):
            return MPIGroup(obj)
        raise TypeError(f"as_group: {type(obj).__name__} is an MPI communicator but not an "
                        f"intra-communicator; accepted: {_ACCEPTED}")
    raise TypeError(f"as_group: cannot make a group from {type(obj).__name__}; "
                    f"accepted: {_ACCEPTED}")


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
    from epcomm import envs
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
