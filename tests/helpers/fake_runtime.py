"""A fake runtime for the CPU tests of the call paths: a CommContext around fake resources, fake
engine states, and Buffers assembled from them (Buffer._assemble), instead of a Buffer made
without its constructor.  Nothing here touches a GPU; the driver calls a test reaches are
patched by the test itself (monkeypatch)."""
from __future__ import annotations

import numpy as np

from epcomm.buffer import Buffer
from epcomm.context import CommContext
from epcomm.kernels import intranode as K_intra
from epcomm.normal.state import NvlinkState


class FakeErr:
    """An error record that never holds an error."""
    poisoned = None
    dev_ptr = 0

    class rec:
        code = 0
        bad_code = 0

    def pending(self):
        return False

    def aborting(self):
        return False

    def check(self, *a, **k):
        pass

    def free(self):
        pass


class FakeGroup:
    """A group of ``size`` ranks seen from ``rank``, all making the same calls (an allgather
    returns this rank's bytes from every rank); collectives are logged to ``log`` when given."""

    def __init__(self, rank: int = 0, size: int = 2, log: list | None = None):
        self.rank, self.size, self.log = rank, size, log

    def barrier(self):
        if self.log is not None:
            self.log.append(("barrier",))

    def allgather_bytes(self, data: bytes) -> list:
        if self.log is not None:
            self.log.append(("allgather", bytes(data)))
        return [bytes(data)] * self.size


def fake_context(num_ranks: int = 2, *, rank: int = 0, group=None, device_sms: int = 132, stream: int = 0,
                 timeout_s: float = 1.0, err=None) -> CommContext:
    """A CommContext of rank ``rank`` on cuda:0 with fake resources (both comm streams ``stream``)."""
    group = group if group is not None else FakeGroup(rank, num_ranks)
    return CommContext(group, rank, num_ranks, 0, err=err if err is not None else FakeErr(), stream=stream,
                       stream2=stream, events=(0, 0, 0), timeout_s=timeout_s, device_sms=device_sms)


class FakeNvlinkState:
    """What the normal-mode call paths read of an NvlinkState, with a 64 MiB layout; the notify
    kernel's publication of the counts is :meth:`wait_counts` (``recv_per_rank`` rows from each
    rank).  The speculation rules are NvlinkState's own."""
    speculative_rows = NvlinkState.speculative_rows
    remember_rows = NvlinkState.remember_rows

    def __init__(self, num_ranks: int = 2, recv_per_rank: int = 4, speculation: float = -1.0,
                 nvl_bytes: int = 64 << 20):
        self.layout = K_intra.BufferLayout.for_bytes(num_ranks, nvl_bytes)
        self.num_ranks, self.recv_per_rank = num_ranks, recv_per_rank
        self.prof, self.host_stamps = 0, {}
        self.info = np.zeros(2 + num_ranks + K_intra.MAX_LOCAL_EXPERTS, np.int32)
        self.recv_history: dict = {}
        self.speculation, self.orphans, self.spec_hits, self.spec_misses = speculation, [], 0, 0

    def params(self, timeout_s):
        return K_intra.IntraParams()

    def publish(self, recv_counts, expert_counts) -> None:
        """What the next :meth:`wait_counts` publishes: the rows from each source rank and the
        per-local-expert counts (e.g. the reference's for this rank); by default every rank
        sends ``recv_per_rank`` rows and the expert counts are 0."""
        self.published = (list(recv_counts), list(expert_counts))

    def wait_counts(self, ctx, what):  # what the notify kernel would publish
        R = self.num_ranks
        recv, experts = getattr(self, "published", None) or ([self.recv_per_rank] * R, [])
        self.info[1] = sum(recv)
        self.info[2:2 + R] = recv
        self.info[2 + R:2 + R + len(experts)] = experts
        self.info[0] = 1

    def free(self):
        pass


def fake_buffer(normal: bool = True, *, num_ranks: int = 2, recv_per_rank: int = 4, ctx=None, low_latency=None,
                **ctx_kw) -> Buffer:
    """A Buffer on a fake runtime: the normal mode on a :class:`FakeNvlinkState` (unless
    ``normal`` is False), the low-latency engine given (or none)."""
    ctx = ctx if ctx is not None else fake_context(num_ranks, **ctx_kw)
    st = FakeNvlinkState(num_ranks, recv_per_rank) if normal else None
    return Buffer._assemble(ctx, nvlink=st, low_latency=low_latency)
