"""The low-latency dispatch's message tags, on a model of every rank's dispatch region
(tests/helpers/ll_headers.py): where a slot's messages sit depends on T and H, so a header a
dispatch of another shape left in the other slot can sit exactly where a call reads one; with
the slot's bare use count as the tag (the two slots count apart) it matched, and its stale token
was received as a row.  The model reproduces the two mismatches of the 2-rank soak on one H100
(benchmarks/results/soak-h100-shared-2ranks-seed1.json: calls 222 and 269, both ranks) from the
soak's call order alone, and none with the kernels' tags (``ll_msg_tag``: the slot in the low
bit)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from ll_headers import HeaderBoard, bare_tag, slot_tag

ROOT = Path(__file__).resolve().parents[2]
BENCH = str(ROOT / "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import soak  # noqa: E402
import soak_check as sc  # noqa: E402

# Collective calls each kind of the soak's normal-mode calls counts (Soak._normal_call).
_NORMAL_CALLS = {"dispatch": 2, "dispatch_layout": 3, "cached": 1, "combine": 1}


def test_the_kernels_tag_messages_with_their_slot():
    src = (ROOT / "cuda_src" / "low_latency.cuh").read_text()
    assert re.search(r"u64 ll_msg_tag\(u64 tag, int slot\) \{\s*return \(0x7FA5ull << 48\) \| \(tag << 1\) \| "
                     r"static_cast<u64>\(slot & 1\);\s*\}", src), "ll_msg_tag is no longer the rule the model's slot_tag follows"
    send = src[src.index("void ll_dispatch_send"):src.index("EPCOMM_DEVICE int ll_msg_match")]
    recv = src[src.index("void ll_dispatch_recv"):src.index("__global__ void __launch_bounds__(kLLThreads) ll_dispatch")]
    for body in (send, recv):
        assert "const u64 msg_tag = ll_msg_tag(tag, p.slot);" in body
    assert "*reinterpret_cast<u64*>(m) = msg_tag;" in send        # the header's tag word
    assert re.search(r"ll_msg_match\([^;]*, msg_tag, K,", recv)   # what the receive matches
    assert slot_tag(5, 0) == (0x7FA5 << 48) + 10 and slot_tag(5, 1) == (0x7FA5 << 48) + 11


@pytest.mark.parametrize("R", [1, 2, 4])
def test_a_header_another_shape_left_in_the_other_slot_matched_only_the_bare_tag(R):
    # T=256 into slot 0 (its first use: count 1), every token to expert 0 of every rank; then
    # T=128 into slot 1 (count 1 too), whose messages sit where the first call's later tokens
    # did (slot 1's region starts after slot 0's: 2 R x 128 messages, R x 256 of the first call).
    E, H = 8 * R, 1024
    L = E // R
    first = [np.tile(np.arange(R) * L, (256, 1)) for _ in range(R)]
    rng = np.random.default_rng(R)
    second = [np.argsort(rng.random((4, E)), axis=1)[:, :R] for _ in range(R)]  # reads R ids, as sent
    for rule, stale in ((bare_tag, True), (slot_tag, False)):
        board = HeaderBoard(R, [(256, H), (128, H)], rule)
        for got, want in board.dispatch(0, 256, H, E, first):
            assert np.array_equal(got, want)
        for d, (got, want) in enumerate(board.dispatch(1, 128, H, E, second)):
            assert (got[0] > want[0]) == stale, (rule.__name__, d, got, want)
            assert np.array_equal(got[1:], want[1:])


def _soak_ll_dispatches(seed: int, R: int, until: int):
    """(call, case, kind, slot) of every low-latency dispatch benchmarks/soak.py makes before
    its call ``until``, in its order (Soak.warm_up, Soak._first, Soak._capture, Soak.run) with
    its call counter (Tracker.calls before the call), and each dispatch's slot as the library
    picks it: every eager dispatch (inside a capture too) takes the host's next slot and flips
    it; a graph's replays run its capture's slot and flip nothing."""
    cases = soak.plan(seed, R, 24, 4096)
    out, calls, host, graph = [], 0, 0, {}

    def eager(c, kind):
        nonlocal host
        out.append((calls, c, kind, host))
        host ^= 1

    for c in cases:  # the first pass: every case checked against the reference, graphs captured
        if c.mode == "normal":
            calls += 2
            continue
        eager(c, "first")
        calls += 2
        for _ in range(2):  # the capture's warm-up calls, on its side stream
            eager(c, "capture warm-up")
            calls += 2
        graph[c.index] = host  # the capture: the host flips its slot, the device runs nothing
        host ^= 1

    def call(c, kind):
        nonlocal calls
        if c.mode == "normal":
            calls += _NORMAL_CALLS[kind]
            return
        if kind == "graph":
            out.append((calls, c, kind, graph[c.index]))
        else:
            eager(c, kind)
        calls += 2

    for c in cases:  # the second pass: every kind of call once
        for kind in dict.fromkeys(soak.NORMAL_KINDS if c.mode == "normal" else soak.LL_KINDS):
            call(c, kind)
    for c, kind in soak.schedule(seed, cases):
        if calls >= until:
            break
        call(c, kind)
    return cases, out


def _mismatches(R, cases, dispatches, rule):
    """{(call, case, kind): ranks whose received rows differ from their routing's}."""
    ll = {c.index: c for c in cases if c.mode == "ll"}
    idx = {i: sc.case_inputs(c, R)["idx"] for i, c in ll.items()}
    board = HeaderBoard(R, {(c.T, c.H) for c in ll.values()}, rule)
    bad = {}
    for call, c, kind, slot in dispatches:
        for d, (got, want) in enumerate(board.dispatch(slot, c.T, c.H, c.E, idx[c.index], c.fp8, c.ue8m0)):
            if not np.array_equal(got, want):
                bad.setdefault((call, c.index, kind), set()).add(d)
    return bad


def test_the_soak_mismatches_were_headers_of_the_other_slot():
    # The GPU run's first 300 calls: its mismatches were hooks at calls 222 (case 19, T=128, slot
    # 1, reading headers case 13 (T=256) left in slot 0 at call 181 with the same count) and
    # 269 (case 13 in slot 0, reading headers of case 19's graph replay at call 263).
    cases, dispatches = _soak_ll_dispatches(1, 2, 300)
    assert _mismatches(2, cases, dispatches, bare_tag) == {(222, 19, "hook"): {0, 1}, (269, 13, "hook"): {0, 1}}
    assert _mismatches(2, cases, dispatches, slot_tag) == {}


def test_slot_tags_match_no_stale_header_whatever_the_shapes_and_slots():
    # Random shapes, routings and slot orders (eager calls alternate, replays keep a slot).
    R, E = 2, 16
    rng = np.random.default_rng(7)
    shapes = [(T, H) for T in (32, 64, 128, 256) for H in (1024, 2048)]
    calls = []
    host = 0
    for _ in range(150):
        T, H = shapes[int(rng.integers(len(shapes)))]
        Kt = int(rng.integers(1, 9))
        idx = []
        for _ in range(R):
            row = np.argsort(rng.random((int(rng.integers(0, T + 1)), E)), axis=1)[:, :Kt]
            row[rng.random(row.shape) < 0.2] = -1
            idx.append(row)
        if rng.random() < 0.3:
            slot = int(rng.integers(2))  # a graph replay: its capture's slot
        else:
            slot, host = host, host ^ 1
        calls.append((slot, T, H, idx, bool(rng.integers(2))))
    stale = {}
    for rule in (bare_tag, slot_tag):
        board = HeaderBoard(R, shapes, rule)
        stale[rule] = sum(not np.array_equal(got, want) for slot, T, H, idx, fp8 in calls
                          for got, want in board.dispatch(slot, T, H, E, idx, fp8))
    assert stale[slot_tag] == 0
    assert stale[bare_tag] > 0  # the model does see the stale headers the bare counts matched


def test_the_receive_marks_a_masked_source_s_slots_as_no_message():
    # Shrink mode: pass 1 of ll_dispatch_recv reads no masked source's headers, and pass 2 reads
    # the matching k of every slot (s_kk, dynamic shared memory) to place rows.  Left unwritten,
    # a masked source's entries hold what an earlier kernel left in shared memory (often >= 0:
    # the previous call's k, a combine's token list), and pass 2 placed them as rows over the
    # live sources' ones (at the masked source's offset, counted as 0 rows).  So every entry
    # with t < T is written, -1 where nothing matched or the source is masked.
    src = (ROOT / "cuda_src" / "low_latency.cuh").read_text()
    recv = src[src.index("void ll_dispatch_recv("):src.index("__launch_bounds__(kLLThreads) ll_dispatch")]
    pass1 = recv[recv.index("// Pass 1"):recv.index("// Pass 2")]
    guard = pass1.index("if (t < T && !((dead >> s) & 1ull)) {")
    depth, i = 0, pass1.index("{", guard)
    while True:  # the end of the guarded block
        depth += {"{": 1, "}": -1}.get(pass1[i], 0)
        if depth == 0:
            break
        i += 1
    stores = [m.start() for m in re.finditer(r"s_kk\[s \* T \+ t\] = ", pass1)]
    assert stores and all(not guard < at < i for at in stores), "an s_kk entry is written only for live sources"
    assert re.search(r"if \(t < T\) s_kk\[s \* T \+ t\] = static_cast<signed char>\(kk\);", pass1[i:])
    assert re.search(r"int kk = -1;\s*if \(t < T && !\(\(dead >> s\) & 1ull\)\) \{", pass1)  # -1 unless matched
    pass2 = recv[recv.index("// Pass 2"):]
    assert "const int kk = t < T ? s_kk[s * T + t] : -1;" in pass2
