"""A model of the low-latency dispatch's message headers in every rank's dispatch region, for CPU
tests of the receive's tag matching across calls of different shapes and slots.

What it follows of ``cuda_src/low_latency.cuh``: a source writes token t's message into slot
(call slot, source, t) of each destination's region, at ``disp_region_off + ((slot R + source) T
+ t) msg_bytes`` (``HeapLayout``), a header (an 8-byte tag, then the K expert ids as int16,
-1 for a dropped one; ids past K keep their old bytes) and the payload after ``HDR_BYTES``
(``ll_dispatch_send``); a destination reads the header of every (source, t < T) of the call's
slot and takes a message whose tag is the call's and whose ids hold its expert, one row per
(message, local expert) (``ll_dispatch_recv``, ``ll_msg_match``).  Tags come from a rule
``tag_rule(count, slot)``, ``count`` the slot's uses so far plus one: :func:`bare_tag` is the
kernels' former rule, :func:`slot_tag` ``ll_msg_tag``.  Payload bytes are modelled only by what
they overwrite: a header they cover matches nothing afterwards (random data never spells a
small tag).  NVLink stores only; the put path's staging copies are not modelled.
"""
from __future__ import annotations

import numpy as np

from epcomm.kernels import low_latency as K

_TAG_BYTES = 8
_HDR_USED = _TAG_BYTES + 2 * K.MAX_TOPK   # tag and ids; the rest of HDR_BYTES is padding
_JUNK_TAG = np.uint64(2**64 - 1)          # what covered tag bytes read as: no call's tag
_JUNK_ID = np.int16(-2)                   # what covered id bytes read as: no expert


def bare_tag(count: int, slot: int) -> int:
    """The slot's count alone (the two slots' tags overlap)."""
    return count


def slot_tag(count: int, slot: int) -> int:
    """``ll_msg_tag``: 0x7FA5 in the high 16 bits, the count shifted left, the slot in the low bit."""
    return (0x7FA5 << 48) | (count << 1) | (slot & 1)


def payload_bytes(H: int, fp8: bool, ue8m0: bool) -> int:
    """Bytes a message's payload writes after its header: the bf16 row, or the e4m3 row and its
    scales (float32, or one UE8M0 byte per 128 channels)."""
    if not fp8:
        return 2 * H
    return H + (H // 128) * (1 if ue8m0 else 4)


class HeaderBoard:
    """Every rank's dispatch region, as the headers at every offset a message of ``shapes``
    ((T, H) pairs) may start at; the slots' use counts, as the kernels keep them."""

    def __init__(self, R: int, shapes, tag_rule):
        starts = set()
        for T, H in shapes:
            m = K.msg_bytes(H)
            starts.update(range(0, 2 * R * T * m, m))
        self.pos = np.array(sorted(starts), dtype=np.int64)
        n = len(self.pos)
        self.R, self.rule = R, tag_rule
        self.tag = np.zeros((R, n), dtype=np.uint64)             # the heap starts zeroed
        self.ids = np.zeros((R, n, K.MAX_TOPK), dtype=np.int16)
        self.count = [0, 0]

    def _index(self, offsets):
        i = np.searchsorted(self.pos, offsets)
        assert np.array_equal(self.pos[i], offsets), "a header offset of a shape the board was not made for"
        return i

    def _cover(self, d: int, a: int, b: int, keep: int = -1) -> None:
        """Bytes [a, b) of rank d's region overwritten by something other than a header at
        ``keep``: headers they meet read as junk (their tag, or only their ids)."""
        lo = np.searchsorted(self.pos, a - _HDR_USED + 1)
        hi = np.searchsorted(self.pos, b)
        for i in range(lo, hi):
            q = int(self.pos[i])
            if q == keep:
                continue
            if q < b and q + _TAG_BYTES > a:
                self.tag[d, i] = _JUNK_TAG
            else:
                self.ids[d, i] = _JUNK_ID

    def dispatch(self, slot: int, T: int, H: int, E: int, idx: list, fp8: bool = False, ue8m0: bool = False):
        """One dispatch of every rank (``idx[r]``: rank r's int [N_r, K] top-k, -1 dropped) into
        ``slot``.  Returns per rank (rows received per local expert, rows its routing sends it),
        both int64 [E/R]; they differ where a header left by an earlier call matched."""
        R, m = self.R, K.msg_bytes(H)
        L = E // R
        tag = self.rule(self.count[slot] + 1, slot)
        P = payload_bytes(H, fp8, ue8m0)
        want = np.zeros((R, L), dtype=np.int64)
        writes = []
        for s in range(R):
            for t, row in enumerate(np.asarray(idx[s])):
                valid = row[row >= 0]
                for d in sorted({int(e) // L for e in valid}):
                    off = ((slot * R + s) * T + t) * m
                    writes.append((d, off, row))
                    for e in valid[valid // L == d]:
                        want[d, int(e) % L] += 1
        # Payloads and header bytes first (a call's own messages never overlap), then the headers.
        for d, off, row in writes:
            self._cover(d, off, off + _TAG_BYTES + 2 * len(row), keep=off)
            self._cover(d, off + K.HDR_BYTES, off + K.HDR_BYTES + P)
        for d, off, row in writes:
            i = self._index(off)
            self.tag[d, i] = np.uint64(tag)
            self.ids[d, i, :len(row)] = np.where(row >= 0, row, -1)
        Kt = np.asarray(idx[0]).shape[1]  # every rank's top-k width (N_r may be 0)
        got = np.zeros((R, L), dtype=np.int64)
        offs = np.array([((slot * R + s) * T + t) * m for s in range(R) for t in range(T)], dtype=np.int64)
        cols = self._index(offs)
        for d in range(R):
            match = self.tag[d, cols] == np.uint64(tag)
            ids = self.ids[d, cols, :Kt]
            for j in range(L):
                got[d, j] = int(np.sum(match & (ids == d * L + j).any(axis=1)))
        self.count[slot] += 1
        return [(got[d], want[d]) for d in range(R)]
