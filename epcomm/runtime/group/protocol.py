"""The Group protocol, the one-process group, and the key-value round protocol.

:class:`KeyValueGroup` is the one implementation of the three collectives over a
key-value store; the adapters (:mod:`.torch`, :mod:`.jax`, :mod:`.files`) supply only
its primitives.  Every collective call is one *round* ``seq`` (0, 1, 2, ... on every rank,
since all ranks call the same collectives in the same order): each rank that contributes
publishes its value under ``key(seq, rank)``, readers wait for the keys they need within
the group's timeout, and each rank deletes its own keys of earlier rounds once a round
that every rank wrote into has completed.
"""
from __future__ import annotations

import time
from typing import Any, Protocol, runtime_checkable

from epcomm import envs
from epcomm.errors import EpcommTimeoutError


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


# ---------------------------------------------------------------------------- argument rules

def as_bytes(data: Any, what: str) -> bytes:
    """``data`` as ``bytes`` (bytearray and memoryview are copied); TypeError for anything else."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"{what}: expected bytes, got {type(data).__name__}")


def check_root(root: int, size: int) -> int:
    """``root`` if it is an int in ``[0, size)``; TypeError or ValueError otherwise."""
    # bool is an int; a stray True would silently mean rank 1
    if isinstance(root, bool) or not isinstance(root, int):
        raise TypeError(f"broadcast root must be an int, got {type(root).__name__}")
    if not 0 <= root < size:
        raise ValueError(f"broadcast root {root} is out of range for a group of size {size}")
    return root


def root_payload(data: bytes | None, rank: int, root: int) -> bytes | None:
    """The root's ``data`` as bytes (ValueError if it is None); ``None`` on every other rank."""
    if rank != root:
        return None
    if data is None:
        raise ValueError(f"broadcast_bytes: rank {rank} is the root and must pass bytes, not None")
    return as_bytes(data, "broadcast_bytes")


def timeout_seconds(timeout_s: float | None) -> float:
    """``timeout_s``, or ``EPCOMM_GROUP_TIMEOUT_S`` when it is None."""
    if timeout_s is not None:
        return float(timeout_s)
    return float(envs.GROUP_TIMEOUT_S.get())


def timeout_error(rank: int, phase: str, missing: list[int], timeout_s: float,
                  extra: str = "") -> EpcommTimeoutError:
    """The error of a wait that expired: names this rank, the phase and the ranks that did not arrive."""
    msg = (f"rank {rank}: timed out after {timeout_s:g} s in {phase}; "
           f"ranks that did not arrive: {missing}")
    if extra:
        msg += f" ({extra})"
    return EpcommTimeoutError(msg, rank=rank, phase=phase, peer=missing[0] if missing else -1)


def cause_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------- LocalGroup

class LocalGroup:
    """The group of one process (rank 0, size 1): every collective returns immediately."""

    rank = 0
    size = 1

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Return ``[data]``.  Raises TypeError if ``data`` is not bytes-like."""
        return [as_bytes(data, "allgather_bytes")]

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        """Return ``data``.  Raises ValueError if ``root != 0`` or ``data`` is None."""
        check_root(root, 1)
        return root_payload(data, 0, root)  # type: ignore[return-value]

    def barrier(self) -> None:
        """Return at once."""

    def __repr__(self) -> str:
        return "LocalGroup()"


# ---------------------------------------------------------------------------- KeyValueGroup

class WaitExpired(Exception):
    """Raised by a ``_get`` primitive whose own timeout expired with nothing more to report;
    the timeout error then carries no chained cause."""


class KeyValueGroup:
    """A :class:`Group` whose collectives are rounds of publish and wait in a key-value store.

    Subclasses supply the primitives:

    - ``_set(key, value)``: publish ``value`` (bytes) under ``key``, visible to readers whole;
    - ``_get(key, timeout_s) -> bytes``: block until ``key`` exists and return its value;
      raise (:class:`WaitExpired` or the store's own error) if it does not appear in time;
    - ``_present(key) -> bool``: whether ``key`` exists (raising counts as absent); used only
      to name the missing ranks after a wait failed;
    - ``_delete(key)``: remove one of this rank's keys (best effort: errors are ignored);
    - ``_new_prefix() -> str``: the group's key space, taken at its first collective when
      ``prefix`` is None;

    and may override ``_key`` (default ``f"{prefix}/{seq}/{rank}"``), ``_store_failed`` and
    ``_timeout_detail``.  Every wait is bounded by ``timeout_s`` (default
    ``EPCOMM_GROUP_TIMEOUT_S``); on expiry :class:`~epcomm.errors.EpcommTimeoutError` names
    this rank, the phase (e.g. ``"group allgather round 3"``) and the ranks that did not arrive.
    """

    def __init__(self, rank: int, size: int, timeout_s: float | None = None,
                 prefix: str | None = None):
        self.rank = rank
        self.size = size
        self.timeout_s = timeout_s
        self.prefix: str | None = prefix
        self._seq = 0
        # this rank's keys not yet deleted, as (seq, key)
        self._own_keys: list[tuple[int, str]] = []

    # ---- primitives (the adapters') ----
    def _set(self, key: str, value: bytes) -> None:
        raise NotImplementedError

    def _get(self, key: str, timeout_s: float) -> bytes:
        raise NotImplementedError

    def _present(self, key: str) -> bool:
        raise NotImplementedError

    def _delete(self, key: str) -> None:
        raise NotImplementedError

    def _new_prefix(self) -> str:
        raise NotImplementedError

    def _key(self, seq: int, rank: int) -> str:
        return f"{self.prefix}/{seq}/{rank}"

    def _store_failed(self, exc: Exception, where: str) -> Exception | None:
        """The error to raise when the store itself failed (not a timeout) ``where``
        (``"round N"`` when publishing, the phase when waiting); None re-raises ``exc``
        when publishing and reports a timeout when waiting."""
        return None

    def _timeout_detail(self, seq: int, exc: Exception) -> str:
        """The parenthesised detail of a timeout error in round ``seq``."""
        return cause_text(exc)

    # ---- the round protocol ----
    def _next(self) -> int:
        if self.prefix is None:
            # taken at the first collective, not at construction: a group made and never used
            # on one rank (e.g. to print it) does not shift the key space of the next group
            self.prefix = self._new_prefix()
        seq = self._seq
        self._seq += 1
        return seq

    def _publish(self, seq: int, data: bytes) -> None:
        key = self._key(seq, self.rank)
        try:
            self._set(key, data)
        except Exception as e:
            failed = self._store_failed(e, f"round {seq}")
            if failed is None:
                raise
            raise failed from e
        self._own_keys.append((seq, key))

    def _wait(self, seq: int, ranks: list[int], phase: str) -> list[bytes]:
        """The values of ``ranks`` in round ``seq``, in that order, all within one timeout."""
        timeout = timeout_seconds(self.timeout_s)
        t0 = time.monotonic()
        deadline = t0 + timeout
        out: list[bytes] = []
        for i, r in enumerate(ranks):
            try:
                out.append(self._get(self._key(seq, r), max(deadline - time.monotonic(), 0.001)))
            except Exception as e:
                err = self._wait_failed(e, seq, ranks[i:], phase, timeout, time.monotonic() - t0)
                raise err from (None if isinstance(e, WaitExpired) else e)
        return out

    def _wait_failed(self, exc: Exception, seq: int, pending: list[int], phase: str,
                     timeout: float, waited: float) -> Exception:
        if waited < 0.9 * timeout:
            # failed well before the deadline: not a timeout but the store itself, if the
            # adapter can tell (its host exited; a network error)
            failed = self._store_failed(exc, phase)
            if failed is not None:
                return failed
        missing = [q for q in pending if not self._is_present(self._key(seq, q))]
        return timeout_error(self.rank, phase, missing or pending[:1], timeout,
                             self._timeout_detail(seq, exc))

    def _is_present(self, key: str) -> bool:
        try:
            return bool(self._present(key))
        except Exception:
            return False

    def _collect_garbage(self, seq: int) -> None:
        """Delete this rank's keys of rounds before ``seq``.

        Called once a round that every rank writes into (allgather, barrier) completed: that
        proves every rank finished reading all earlier rounds.  (Finishing a broadcast proves
        nothing about the other ranks, so it never triggers clean-up.)
        """
        keep = []
        for s, key in self._own_keys:
            if s < seq:
                try:
                    self._delete(key)
                except Exception:
                    pass  # best effort: a leftover key only costs the store's space
            else:
                keep.append((s, key))
        self._own_keys = keep

    def _everyone(self, seq: int, data: bytes, phase: str) -> list[bytes]:
        self._publish(seq, data)
        out = self._wait(seq, list(range(self.size)), phase)
        self._collect_garbage(seq)
        return out

    # ---- the collectives ----
    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Return every rank's ``data``, indexed by rank.

        Raises TypeError if ``data`` is not bytes-like, EpcommTimeoutError if some rank does
        not contribute within the timeout.
        """
        data = as_bytes(data, "allgather_bytes")
        seq = self._next()
        return self._everyone(seq, data, f"group allgather round {seq}")

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        """Return ``data`` of rank ``root`` on every rank.

        Raises TypeError/ValueError for a bad ``root`` or a root passing None,
        EpcommTimeoutError on a non-root if the root does not publish in time.
        """
        check_root(root, self.size)
        payload = root_payload(data, self.rank, root)
        seq = self._next()
        if payload is not None:
            self._publish(seq, payload)
            return payload
        return self._wait(seq, [root], f"group broadcast round {seq} from rank {root}")[0]

    def barrier(self) -> None:
        """Return once every rank has entered the barrier.

        Raises EpcommTimeoutError naming the ranks that did not arrive within the timeout.
        """
        seq = self._next()
        self._everyone(seq, b"", f"group barrier round {seq}")
