"""A model of how far apart the ranks of a low-latency Buffer can run, for CPU tests of what a
send may overwrite while a peer still reads it.

What it follows of ``cuda_src/low_latency.cuh``: every rank makes the same calls (:class:`Call`:
a dispatch "d" or combine "c", its slot and its shape (T, H, E)), each in steps run in the rank's
program order (``program``; by default every call's steps in turn, as one kernel per call or a
receive hook called right away).  A dispatch is "send" then "recv"; a combine is "send" (its
acknowledgement waits, then block 0 copies its weights into every peer), "rows" (the expert
side's rows and partials, each peer's after that peer's weights arrived) then "recv".  A step
starts once what it waits for has happened and ends at any time after (every interleaving is
explored):

* a send waits for every rank's acknowledgement of the previous call of its operation and slot,
  sent when that call's receive ended there (``ll_dispatch_send``, ``ll_combine_send``);
* with ``quiet`` (``ll_wait_layout_quiet``): a send whose heap layout differs from that of the
  last call whose receive ended on its rank also waits until every rank has ended every receive
  its own rank ended;
* a combine's rows wait for every peer's weights of the call (``comb_wflag``): the peer's send
  step started;
* a receive waits for every rank's send of its call (``ll_wait_arrivals``; a combine's: the rows).

A running step writes into every peer's heap (a dispatch send: its slot's messages; a combine
send: the weights; rows: the rows) at its shape's ``HeapLayout`` offsets, and reads its own
(a dispatch receive: its slot's messages; rows: the weights the peers wrote; a combine receive:
the rows).  :meth:`OrderModel.explore` lists where a running step writes bytes a peer's running
step of another call reads.  NVLink stores only (the put path's staging copies and the caller's
writes into a zero-copy combine buffer are not modelled); every combine with partials.
"""
from __future__ import annotations

from dataclasses import dataclass

from epcomm.kernels import low_latency as K


@dataclass(frozen=True)
class Call:
    op: str       # "d" dispatch, "c" combine
    slot: int
    shape: tuple  # (T, H, E): what the heap layout depends on (with R)


def steps_of(call: Call) -> tuple:
    return ("send", "recv") if call.op == "d" else ("send", "rows", "recv")


def _slot_range(base: int, size: int, slot: int) -> tuple:
    return (base + slot * size, base + (slot + 1) * size)


def regions(call: Call, R: int, step: str) -> tuple[list, list]:
    """(byte ranges a step writes in every peer's heap, byte ranges it reads in its own)."""
    T, H, E = call.shape
    lay = K.HeapLayout.make(T, H, E, R)
    msgs = _slot_range(lay.disp_region_off, R * T * lay.msg_bytes, call.slot)
    rows = _slot_range(lay.comb_region_off, T * K.MAX_TOPK * H * 2, call.slot)
    wts = _slot_range(lay.comb_w_off, R * T * K.MAX_TOPK * 4, call.slot)
    if call.op == "d":
        return ([msgs], []) if step == "send" else ([], [msgs])
    return {"send": ([wts], []), "rows": ([rows], [wts]), "recv": ([], [rows])}[step]


def _meet(a, b) -> bool:
    return any(x0 < y1 and y0 < x1 for x0, x1 in a for y0, y1 in b)


class OrderModel:
    """``R`` ranks making ``calls``; ``program``: every rank's steps in order, as (call index,
    step), each call's in its own order (default: every call's steps in turn)."""

    def __init__(self, R: int, calls, program=None, *, quiet: bool = False):
        self.R, self.calls, self.quiet = R, list(calls), quiet
        self.prog = list(program) if program is not None else [(n, s) for n, c in enumerate(self.calls)
                                                                for s in steps_of(c)]
        self.pos = {step: i for i, step in enumerate(self.prog)}

    # A rank's state: (steps ended, whether the next one is running).
    def _ended(self, st, r, n, step) -> bool:
        return st[r][0] > self.pos[(n, step)]

    def _started(self, st, r, n, step) -> bool:
        i = self.pos[(n, step)]
        return st[r][0] > i or (st[r][0] == i and st[r][1])

    def _may_start(self, st, r) -> bool:
        n, step = self.prog[st[r][0]]
        call = self.calls[n]
        if step == "recv":
            last = "send" if call.op == "d" else "rows"
            return all(self._ended(st, q, n, last) for q in range(self.R))
        if step == "rows":
            return all(self._started(st, q, n, "send") for q in range(self.R))
        prev = [m for m in range(n) if self.calls[m].op == call.op and self.calls[m].slot == call.slot]
        if prev and not all(self._ended(st, q, prev[-1], "recv") for q in range(self.R)):
            return False
        if self.quiet:
            received = [m for m, s in self.prog[:st[r][0]] if s == "recv"]
            if received and self.calls[received[-1]].shape != call.shape:
                return all(self._ended(st, q, m, "recv") for q in range(self.R) for m in received)
        return True

    def _running(self, st, r):
        i, running = st[r]
        return self.prog[i] if running else None

    def hazards(self, st) -> set:
        """{(writer, its call, reader, its call)}: a running step of the writer writes what a
        running step of another call on the reader reads."""
        out = set()
        for a in range(self.R):
            w = self._running(st, a)
            if w is None:
                continue
            wrote = regions(self.calls[w[0]], self.R, w[1])[0]
            for b in range(self.R):
                rd = self._running(st, b)
                if b == a or rd is None or rd[0] == w[0]:
                    continue
                if _meet(wrote, regions(self.calls[rd[0]], self.R, rd[1])[1]):
                    out.add((a, w[0], b, rd[0]))
        return out

    def explore(self) -> tuple[set, list]:
        """(every hazard of every reachable state, the reachable states where no rank can move
        short of the end: a deadlock)."""
        end = len(self.prog)
        start = tuple((0, False) for _ in range(self.R))
        seen, todo, found, stuck = {start}, [start], set(), []
        while todo:
            st = todo.pop()
            found |= self.hazards(st)
            moves = []
            for r in range(self.R):
                i, running = st[r]
                if i == end:
                    continue
                if running:
                    moves.append(st[:r] + ((i + 1, False),) + st[r + 1:])
                elif self._may_start(st, r):
                    moves.append(st[:r] + ((i, True),) + st[r + 1:])
            if not moves and any(s[0] != end for s in st):
                stuck.append(st)
            for m in moves:
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        return found, stuck
