"""How far apart the ranks of a low-latency Buffer can run, on a model of the kernels' waits
(tests/helpers/ll_order.py): where every region sits depends on (T, H, E), and a send waits only
for the acknowledgement of the previous call of its own operation and slot.  So a rank whose
receive of a call ended could send the next call, of another layout, into a peer still reading
its copy of the first (its receive ends later): a dispatch of T=256 writing its messages over the
rows a T=128 combine is adding up there.  The kernels now wait, when the layout changes, until
every peer acknowledged every receive that ended here (``ll_wait_layout_quiet``); two calls of
different layouts in flight through receive hooks stay unsafe whatever the kernels wait for, so
the host refuses them (``LowLatencyState.check_hooks``)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from ll_order import Call, OrderModel

from epcomm.kernels import low_latency as K

ROOT = Path(__file__).resolve().parents[2]
SMALL, BIG = (128, 2048, 8), (256, 7168, 32)  # two of the soak's low-latency shapes (--seed 1)


def _rounds(shapes, slots=None):
    """A dispatch and its combine per shape, in the slot the host alternates to (or ``slots``)."""
    out = []
    for k, shape in enumerate(shapes):
        s = k % 2 if slots is None else slots[k]
        out += [Call("d", s, shape), Call("c", s, shape)]
    return out


@pytest.mark.parametrize("R", [2, 3])
def test_a_send_of_another_layout_wrote_into_a_receive_a_peer_had_not_ended(R):
    calls = _rounds([SMALL, BIG])
    found, stuck = OrderModel(R, calls).explore()
    # Call 2 (the T=256 dispatch, slot 1) writes its messages where a peer's call 1 (the T=128
    # combine, slot 0) reads its rows.
    assert {(w, n, r, m) for w, n, r, m in found} >= {(0, 2, 1, 1), (1, 2, 0, 1)} and not stuck
    found, stuck = OrderModel(R, calls, quiet=True).explore()
    assert found == set() and stuck == []


@pytest.mark.parametrize("R", [2, 3])
def test_calls_of_one_layout_never_write_where_a_peer_reads(R):
    for shape in (SMALL, BIG):
        calls = _rounds([shape] * 4, slots=[0, 1, 1, 0])
        assert OrderModel(R, calls).explore() == (set(), [])


@pytest.mark.parametrize("R", [2, 3])
def test_the_layout_wait_leaves_no_overlap_and_no_deadlock(R):
    # Random shapes, and slots as eager calls (alternating) and graph replays (a fixed slot) take them.
    shapes = [SMALL, BIG, (128, 4096, 32), (256, 2048, 4)]
    rng = np.random.default_rng(R)
    before = 0
    for _ in range(6 if R == 2 else 3):
        picks = [shapes[int(rng.integers(len(shapes)))] for _ in range(7)]
        host, slots = 0, []
        for _ in picks:
            if rng.random() < 0.3:
                slots.append(int(rng.integers(2)))
            else:
                slots.append(host)
                host ^= 1
        calls = _rounds(picks, slots)
        before += len(OrderModel(R, calls).explore()[0])
        assert OrderModel(R, calls, quiet=True).explore() == (set(), [])
    assert before > 0  # the model does see the overlaps without the wait


def test_two_dispatches_in_flight_overlap_unless_they_share_a_layout():
    # Two micro-batches: both sends, then both receive hooks.  Nothing the kernels wait for
    # orders the second send after the first receive, so only one layout may be in flight.
    prog = [(0, "send"), (1, "send"), (0, "recv"), (1, "recv")]
    for quiet in (False, True):
        found, stuck = OrderModel(2, [Call("d", 0, BIG), Call("d", 1, SMALL)], prog, quiet=quiet).explore()
        assert (0, 1, 1, 0) in found and not stuck
        assert OrderModel(2, [Call("d", 0, BIG), Call("d", 1, BIG)], prog, quiet=quiet).explore() == (set(), [])


def _body(src: str, start: str, end: str) -> str:
    return src[src.index(start):src.index(end, src.index(start))]


def test_the_kernels_wait_for_a_layout_change_before_their_first_write():
    src = (ROOT / "cuda_src" / "low_latency.cuh").read_text()
    quiet = _body(src, "EPCOMM_DEVICE bool ll_wait_layout_quiet", "\n}\n")
    # Every (peer, operation, slot), up to the receives that ended here.
    assert "if (prev == layout) return true;" in quiet and "i < 4 * R" in quiet
    assert "comb ? &p.ctrl->comb_seq[s] : &p.ctrl->disp_seq[s]" in quiet
    assert "(comb ? p.comb_ack_off : p.disp_ack_off)) + s * R + d" in quiet
    word = _body(src, "EPCOMM_DEVICE u64 ll_layout_word", "\n}\n")
    assert "p.max_tokens" in word and "hidden / 128" in word and "p.num_experts" in word
    send = _body(src, "EPCOMM_DEVICE void ll_dispatch_send(", "\n}\n")
    wait = send.index("ll_wait_layout_quiet(p, prev_layout, ll_layout_word(p, kHidden)")
    assert wait < send.index("*reinterpret_cast<u64*>(m) = msg_tag;")  # before the first message
    comb = _body(src, "EPCOMM_DEVICE void ll_combine_send(", "\n}\n")
    wait = comb.index("ll_wait_layout_quiet(p, prev_layout, ll_layout_word(p, kHidden)")
    assert wait < comb.index("dst[i] = p.topk_weights[i];")             # before the weights
    for recv, seq in (("EPCOMM_DEVICE void ll_dispatch_recv(", "disp_seq"), ("EPCOMM_DEVICE void ll_combine_recv(",
                                                                            "comb_seq")):
        body = _body(src, recv, "\n}\n")
        assert re.search(rf"p\.ctrl->{seq}\[p\.slot\] = tag;\s*p\.ctrl->layout = ll_layout_word\(p, kHidden\);",
                         body), recv
    for kernel in ("ll_dispatch(const __grid_constant__", "ll_combine(const __grid_constant__"):
        body = _body(src, kernel, "\n}\n")
        assert "s_layout = *reinterpret_cast<volatile u64*>(&p.ctrl->layout);" in body
        assert "(p, tag, s_layout, deadline)" in body
    # The host's mirror of the control words holds it (zeroed with them: no layout yet).
    assert K.LLCtrl.layout.offset == K.LLCtrl.pad.offset + 4


def _hops(body: str, call: str) -> str:
    """The hops argument of the shrink_deadline inside ``call`` (its first line in ``body``)."""
    at = body.index(call)
    m = re.compile(r"shrink_deadline\(deadline, p\.timeout_ns, p\.shrink, ([^;]*?)\)(?:,|\)\))").search(body, at)
    assert m is not None, call
    return m.group(1).strip()


def test_shrink_deadlines_count_the_layout_wait_of_the_peer_they_wait_for():
    # Shrink mode: a wait for what a peer makes after waits of its own gets one timeout per such
    # wait (shrink_deadline), or a peer held up by a dead rank is masked although alive.  A
    # combine source publishes its weights after its acknowledgement wait and, where the layout
    # changed (at the same call on every rank: they make the same calls), its layout's quiet
    # wait (one timeout more): the weights wait needs 1 hop, 2 after a layout change; the
    # receive of a one-kernel call one more than that.
    src = (ROOT / "cuda_src" / "low_latency.cuh").read_text()
    comb = _body(src, "EPCOMM_DEVICE void ll_combine_send(", "\n}\n")
    changed = "(prev_layout != ll_layout_word(p, kHidden))"
    quiet = _hops(comb, "ll_wait_layout_quiet(p, prev_layout")
    assert quiet == "1"
    weights = _hops(comb, "got = wait_geq_u64_masked(f, tag, p.err,")
    m = re.search(rf"const int {re.escape(weights)} = 1 \+ {re.escape(changed)};", comb)
    assert m is not None and m.start() < comb.index("got = wait_geq_u64_masked(f, tag, p.err,"), weights
    kernel = _body(src, "ll_combine(const __grid_constant__", "\n}\n")
    assert "const int hops = 2 + (kPhases == 3 && s_layout != ll_layout_word(p, kHidden));" in kernel
    disp = _body(src, "EPCOMM_DEVICE void ll_dispatch_send(", "\n}\n")
    assert _hops(disp, "ll_wait_layout_quiet(p, prev_layout") == "1"
    kernel = _body(src, "ll_dispatch(const __grid_constant__", "\n}\n")
    assert "const int hops = 1 + (kPhases == 3 && s_layout != ll_layout_word(p, kHidden));" in kernel
