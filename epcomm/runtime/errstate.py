"""Device-side error records and their translation into Python exceptions.

Kernels that wait on peers, or that see bad indices, write an ``ErrorRecord`` (see
``cuda_src/epcomm_common.cuh``) living in host-mapped pinned memory, so the host can read it
without synchronising with the GPU.  Each Buffer owns one; standalone functions use one per
device.
"""
from __future__ import annotations

import ctypes
import threading

from epcomm.errors import BufferStateError, EpcommError, EpcommTimeoutError, RankMismatchError
from epcomm.runtime import driver

ERR_NONE, ERR_TIMEOUT, ERR_OVERFLOW, ERR_BAD_INPUT, ERR_MISMATCH = 0, 1, 2, 3, 4

PHASES = {
    1: "get_dispatch_layout",
    10: "dispatch/notify: waiting for the peer to release the buffer (it has not finished its previous call)",
    11: "dispatch/notify: waiting for the peer's token counts",
    12: "dispatch (a bad expert index)",
    13: "dispatch/receive: waiting for a chunk of rows from the peer",
    20: "combine/send: waiting for the peer to release the buffer (it has not finished its previous call)",
    21: "combine/receive: waiting for a chunk of rows from the peer",
    30: "low_latency_dispatch/send: waiting for the peer to release the buffer slot",
    31: "low_latency_dispatch/receive: waiting for the peer's tokens",
    32: "low_latency_dispatch/send (a bad expert index)",
    40: "low_latency_combine/send: waiting for the peer to release the buffer slot",
    41: "low_latency_combine/receive: waiting for the peer's rows",
    42: "low_latency_combine/send: waiting for the peer's combine weights",
    43: "low_latency_combine/receive (a bad expert index)",
    50: "smoke test",
}

# Kernels that skip a bad expert index and record it (the phase travels in bad_limit >> 32).
BAD_INDEX_SEEN_BY = {0: "get_dispatch_layout", 1: "get_dispatch_layout", 12: "dispatch", 32: "low_latency_dispatch",
                     43: "low_latency_combine"}


# How the kernel families' mismatch records read, registered by the families themselves
# (epcomm.kernels.*) so that this layer needs no knowledge of them: a phase whose record holds two
# packed shape words -> the function unpacking one into {field: value}; the intranode mailbox's
# agreed words, in the order of their channel numbers.
_SHAPE_WORDS: dict = {}
_MAILBOX_FIELDS: list = []


def register_shape_word(phase: int, unpack, call: str = "low_latency_dispatch",
                        advice: str = ("num_max_dispatch_tokens_per_rank, hidden size, num_experts, top-k width and "
                                       "FP8 flags, and run with the same EPCOMM_LL_* settings")) -> None:
    """Mismatch records of ``phase`` hold shape words that ``unpack(word) -> dict`` decodes;
    ``call`` names the operation and ``advice`` what every rank must pass alike."""
    _SHAPE_WORDS[phase] = (unpack, call, advice)


def register_phases(phases: dict, bad_index_phases: dict | None = None) -> None:
    """A kernel family's wait phases (number -> description for messages), and those of its
    phases that record a skipped bad expert index (number -> operation name)."""
    PHASES.update(phases)
    BAD_INDEX_SEEN_BY.update(bad_index_phases or {})


def register_mailbox_fields(fields) -> None:
    """The names of the mailbox words ranks agree on, by channel (a mismatch record's channel)."""
    _MAILBOX_FIELDS[:] = list(fields)


class ErrorRecord(ctypes.Structure):
    _fields_ = [("code", ctypes.c_int), ("rank", ctypes.c_int), ("phase", ctypes.c_int),
                ("channel", ctypes.c_int), ("peer", ctypes.c_int), ("pad", ctypes.c_int),
                ("expected", ctypes.c_uint64), ("observed", ctypes.c_uint64),
                # a bad expert index seen on the device (its own slot: it stops nothing)
                ("bad_code", ctypes.c_int), ("bad_token", ctypes.c_int),
                ("bad_limit", ctypes.c_uint64), ("bad_value", ctypes.c_uint64)]


class ErrorState:
    """One host-mapped ErrorRecord: ``dev_ptr`` goes to kernels, :meth:`check` raises."""

    def __init__(self, device_id: int, record: ErrorRecord | None = None):
        """A zeroed record in pinned host memory mapped for ``device_id``; or, with ``record``,
        that record as it is, in ordinary host memory (no driver: the CPU tests of decoding;
        :meth:`free` then releases nothing)."""
        self.device_id = device_id
        self._record = record  # kept alive: self.rec views its memory
        if record is not None:
            self.host_ptr, self.dev_ptr, self._owned = ctypes.addressof(record), 0, False
        else:
            with driver.on_device(device_id):
                self.host_ptr, self.dev_ptr = driver.host_alloc_mapped(ctypes.sizeof(ErrorRecord))
            self._owned = True
            ctypes.memset(self.host_ptr, 0, ctypes.sizeof(ErrorRecord))
        self.rec = ErrorRecord.from_address(self.host_ptr)
        self.poisoned: Exception | None = None

    def pending(self) -> bool:
        return self.rec.code != 0 or self.rec.bad_code > 0

    def aborting(self) -> bool:
        """A recorded error that makes the kernels give up (not a skipped bad index, which the
        call survives and the next check reports): the host's mirror of the device's aborted()."""
        return self.rec.code != 0

    def settled_code(self, wait_s: float = 0.1) -> int:
        """The record's code, read again while a kernel is writing the record (code -1: claimed,
        fields being filled, the code written last), for up to ``wait_s``.  A writer needs
        microseconds; a code still -1 after that stays -1 (the kernel died mid-write).
        Reading -1 as final reported a rank mismatch as a timeout with the mismatch's fields
        (seen on 2x H200: the host polls the record while it waits for the counts)."""
        code = self.rec.code
        if code != -1:
            return code
        import time
        end = time.monotonic() + wait_s
        while code == -1 and time.monotonic() < end:
            time.sleep(0)
            code = self.rec.code
        return code

    def to_exception(self, context: str = "", code: int | None = None) -> Exception | None:
        """The recorded error as an exception (None if there is none).  ``code``: the record's
        code as the caller already read it (a kernel may write the record meanwhile)."""
        r = self.rec
        if code is None:
            code = self.settled_code()
        if code == 0:
            if r.bad_code <= 0:  # nothing, or a bad index still being written (seen next time)
                return None
            # bad_limit: num_experts, and the phase in the high half (0: get_dispatch_layout).
            limit, ph = r.bad_limit & 0xFFFFFFFF, r.bad_limit >> 32
            return ValueError(
                f"{BAD_INDEX_SEEN_BY.get(ph, PHASES[1])}{' (reported in ' + context + ')' if context else ''}: "
                f"topk_idx holds expert index {ctypes.c_int64(r.bad_value).value} (token {r.bad_token}), "
                f"outside [-1, {limit}); the kernels skipped it")
        if code == -1:  # still being written after settled_code's wait: report what is there
            code = ERR_TIMEOUT
        phase = PHASES.get(r.phase, f"phase {r.phase}")
        where = f" in {context}" if context else ""
        if code == ERR_TIMEOUT:
            # The low-latency receives count the sending blocks (ll_arrived in low_latency.cuh).
            seen = (f"{r.observed} of the peer's {r.expected or 'unknown number of'} blocks had arrived"
                    if r.phase in (31, 41) else f"expected flag >= {r.expected}, saw {r.observed}")
            return EpcommTimeoutError(
                f"rank {r.rank}: timed out{where} at {phase}; channel {r.channel}, peer rank "
                f"{r.peer} ({seen}). The peer never arrived: "
                f"did every rank make the same sequence of calls? (timeout: EPCOMM_TIMEOUT_S)",
                rank=r.rank, phase=phase, channel=r.channel, peer=r.peer)
        if code == ERR_OVERFLOW:
            return EpcommError(
                f"rank {r.rank}{where}: received {r.observed} tokens but the output has only "
                f"{r.expected} rows (num_worst_tokens too small); rows past it were dropped")
        if code == ERR_MISMATCH and r.phase in _SHAPE_WORDS:  # the low-latency receive: shape words
            unpack, call, advice = _SHAPE_WORDS[r.phase]
            mine, theirs = unpack(r.expected), unpack(r.observed)
            diff = [f"{k} is {mine[k]} here and {theirs[k]} there" for k in mine if mine[k] != theirs[k]]
            field = next((k for k in mine if mine[k] != theirs[k]), "")
            return RankMismatchError(
                f"rank {r.rank}{where}: rank {r.peer} called {call} with a different shape: "
                f"{'; '.join(diff) or 'unreadable shape word'}. Every rank must pass the same {advice}; the "
                f"received rows were not read, and this Buffer is unusable now (create a new one).",
                rank=r.rank, peer=r.peer, field=field, mine=mine.get(field, 0), theirs=theirs.get(field, 0))
        if code == ERR_MISMATCH:
            fields = _MAILBOX_FIELDS
            field = fields[r.channel] if 0 <= r.channel < len(fields) else f"#{r.channel}"
            mine, theirs = ctypes.c_int32(r.expected).value, ctypes.c_int32(r.observed).value
            what = {"chunk_rows": "chunk_rows (from Config.chunk_rows and the buffer's capacity)",
                    "fp8": "fp8 (1: x is an FP8 pair)", "num_topk": "num_topk (columns of topk_idx; 0: none)"}
            return RankMismatchError(
                f"rank {r.rank}{where}: rank {r.peer} called it with a different shape: "
                f"{what.get(field, field)} is {mine} here and {theirs} there. Every rank must pass the same "
                f"hidden size, dtype, top-k width, num_experts and Config; nothing was sent, and this Buffer "
                f"is unusable now (create a new one).",
                rank=r.rank, peer=r.peer, field=field, mine=mine, theirs=theirs)
        return EpcommError(f"device error code {code}{where} (phase {phase})")

    def check(self, context: str = "", *, poison_on_timeout: bool = True, collective: bool = False) -> None:
        """Raise the recorded error, if any.  Timeouts and overflows poison the owner state.

        A bad expert index (which the kernels skipped: the call that saw it completed on every
        rank) is reported once: raised as ValueError, or, with ``collective`` (the start of a
        call every rank makes), issued as a RuntimeWarning so that this rank still joins the
        call (raising would leave its peers waiting until they time out)."""
        if self.poisoned is not None:
            raise BufferStateError(f"unusable after an earlier error: {self.poisoned}")
        # One read decides: a timeout recorded while a bad index is reported stays for the next
        # check (the bad index's reset below clears its own slot only).
        code = self.settled_code()
        exc = self.to_exception(context, code)
        if exc is None:
            return
        if code == 0:  # a bad index (its own slot): reported once, the state stays usable
            off = ErrorRecord.bad_code.offset
            ctypes.memset(self.host_ptr + off, 0, ctypes.sizeof(ErrorRecord) - off)
            if collective:
                import warnings
                warnings.warn(f"{exc} (Buffer.check() raises this as ValueError when called before the next call)",
                              RuntimeWarning, stacklevel=4)
                return
        elif isinstance(exc, ValueError) or not poison_on_timeout:
            self.reset()
        else:
            self.poisoned = exc
        raise exc

    def reset(self) -> None:
        ctypes.memset(self.host_ptr, 0, ctypes.sizeof(ErrorRecord))

    def free(self) -> None:
        if self.host_ptr:
            try:
                if self._owned:
                    driver.host_free(self.host_ptr)
            finally:
                self.host_ptr = self.dev_ptr = 0


_DEFAULT: dict[int, ErrorState] = {}
_LOCK = threading.Lock()


def default_state(device_id: int) -> ErrorState:
    st = _DEFAULT.get(device_id)
    if st is None:
        with _LOCK:
            st = _DEFAULT.get(device_id)
            if st is None:
                st = _DEFAULT[device_id] = ErrorState(device_id)
    return st
