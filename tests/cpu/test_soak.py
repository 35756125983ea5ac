"""The soak's checks (benchmarks/soak_check.py) on tiny cases, without a GPU: results made from
the reference pass, one flipped bit in any checked part is reported (by the reference check and
by the hash of a repeated call), bytes the contract leaves unspecified are not compared, and the
plan, the schedule and the summary of a cut run are what benchmarks/soak.py relies on."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

BENCH = str(Path(__file__).resolve().parents[2] / "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import soak_check as sc  # noqa: E402


def _t(a: np.ndarray):
    """The NumPy array as the torch tensor an engine would return (bf16 / FP8 included)."""
    return sc.to_torch(a, "cpu")


def _flip(t, index):
    """A copy of torch tensor ``t`` with one bit of element ``index`` flipped."""
    words = {torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float8_e4m3fn: torch.uint8}
    u = t.clone()
    v = u.view(words.get(t.dtype, t.dtype))
    v[index] = v[index] ^ 1
    return u


def _normal_results(ref, d: int, garbage_rows: bool):
    """Rank d's dispatch results (res tuple) and combine results from the reference; with
    ``garbage_rows`` the padding rows of recv_x (num_worst_tokens: unwritten) hold other bytes."""
    r = ref["dispatch"][d]
    x = r.recv_x.copy()
    if garbage_rows and x.shape[0] > r.handle.num_recv_tokens:
        x[r.handle.num_recv_tokens:] = x.dtype.type(3.0)
    recv_x = _t(x) if r.recv_x_scales is None else (_t(x), _t(r.recv_x_scales))
    rti = None if r.recv_topk_idx is None else _t(r.recv_topk_idx)
    rtw = None if r.recv_topk_weights is None else _t(r.recv_topk_weights)
    cx, cw = ref["combine"][d]
    return (recv_x, rti, rtw, r.num_recv_tokens_per_expert_list), (_t(cx), None if cw is None else _t(cw))


@pytest.mark.parametrize("fp8,worst", [(False, 0), (True, 0), (False, 64), (True, 64)])
def test_normal_checks_pass_the_reference_and_catch_one_flipped_bit(fp8, worst):
    R = 2
    case = sc.Case(0, "normal", 7, (5, 3), 256, 3, 8, fp8, 0.2, col_scales=fp8, worst=worst)
    inp = sc.case_inputs(case, R)
    ref = sc.normal_reference(case, R, inp)
    flipped = 0
    for d in range(R):
        tr = sc.Tracker()
        M = ref["dispatch"][d].handle.num_recv_tokens
        res, comb = _normal_results(ref, d, garbage_rows=True)
        parts = sc.normal_parts(res, M)
        assert sc.verify_normal(parts, comb, ref, d) == []
        h = sc.hash_parts(parts)
        tr.first((d, "all"), h, [], 0)
        tr.repeat((d, "all"), sc.hash_parts(sc.normal_parts(_normal_results(ref, d, False)[0], M)), 1)
        assert tr.mismatches == []  # padding rows are not compared
        if M == 0:
            continue
        flipped += 1
        x = res[0][0] if fp8 else res[0]
        bad_x = _flip(x, (M - 1, 5))
        bad = ((bad_x, res[0][1]) if fp8 else bad_x,) + res[1:]
        assert sc.verify_normal(sc.normal_parts(bad, M), comb, ref, d) == ["recv_x"]
        tr.repeat((d, "all"), sc.hash_parts(sc.normal_parts(bad, M)), 2)
        assert tr.mismatches[-1] == (2, d, "all", ["recv_x"])
        assert sc.verify_normal(parts, (_flip(comb[0], (0, 0)), comb[1]), ref, d) == ["combined_x"]
        assert sc.verify_normal(parts, (comb[0], _flip(comb[1], (0, 0))), ref, d) == ["combined_topk_weights"]
        idx = parts["recv_topk_idx"].clone()
        idx[0, 0] += 1
        assert sc.verify_normal(dict(parts, recv_topk_idx=idx), comb, ref, d) == ["recv_topk_idx"]
        if not worst:
            wrong = dict(parts, experts=[n + 1 for n in parts["experts"]])
            assert sc.verify_normal(wrong, comb, ref, d) == ["experts"]
    assert flipped  # the case routes rows to some rank


@pytest.mark.parametrize("fp8,ue8m0", [(False, False), (True, False), (True, True)])
def test_low_latency_checks_pass_the_reference_and_catch_one_flipped_bit(fp8, ue8m0):
    R = 2
    case = sc.Case(1, "ll", 11, (3, 4), 256, 2, 4, fp8, 0.3, T=4, round_scale=ue8m0, ue8m0=ue8m0)
    inp = sc.case_inputs(case, R)
    ref = sc.ll_reference(case, R, inp, partials=True)
    flipped = 0
    for d in range(R):
        r = ref["dispatch"][d]
        x = r.recv_x.copy()
        rows = np.arange(x.shape[1])[None, :] >= r.recv_count[:, None]
        x[rows] = x.dtype.type(2.0)  # unspecified rows past each count
        rx = _t(x) if r.recv_x_scales is None else (_t(x), _t(r.recv_x_scales))
        parts = sc.ll_parts(rx, _t(r.recv_count), _t(r.handle.src_info), _t(r.handle.layout_range))
        out = _t(ref["combine"][d])
        assert sc.verify_ll(parts, out, ref, d) == []
        clean = sc.ll_parts(_t(r.recv_x) if r.recv_x_scales is None else (_t(r.recv_x), _t(r.recv_x_scales)),
                            _t(r.recv_count), _t(r.handle.src_info), _t(r.handle.layout_range))
        assert sc.hash_parts(parts) == sc.hash_parts(clean)
        j = int(np.argmax(r.recv_count))
        if r.recv_count[j] == 0:
            continue
        flipped += 1
        px = parts["recv_x"]
        bad = dict(parts, recv_x=_flip(px, (j, 0, 1)))
        assert sc.verify_ll(bad, out, ref, d) == ["recv_x"]
        assert sc.hash_parts(bad)["recv_x"] != sc.hash_parts(parts)["recv_x"]
        assert sc.verify_ll(parts, _flip(out, (0, 0)) if out.numel() else out, ref, d) == (
            ["combined_x"] if out.numel() else [])
        cnt = parts["count"].clone()
        cnt[j] -= 1
        assert "count" in sc.verify_ll(dict(parts, count=cnt), out, ref, d)
    assert flipped


def test_plan_and_schedule_follow_the_issue_and_repeat_on_every_rank():
    soak = pytest.importorskip("soak")
    cases = soak.plan(3, 2, 40, 4096)
    assert cases == soak.plan(3, 2, 40, 4096)
    assert {c.mode for c in cases} == {"normal", "ll"}
    for c in cases:
        assert 1 <= c.K <= 8 and c.E % 2 == 0 and len(c.Ns) == 2
        if c.mode == "normal":
            assert c.H in sc.HIDDEN and all(0 <= n <= 4096 for n in c.Ns) and (not c.fp8 or c.H % 128 == 0)
        else:
            assert c.H % 128 == 0 and all(0 <= n <= c.T for n in c.Ns) and (not c.ue8m0 or c.round_scale)
    assert {c.H for c in cases if c.mode == "normal"} == set(sc.HIDDEN)
    import itertools
    a = list(itertools.islice(soak.schedule(3, cases), 400))
    assert a == list(itertools.islice(soak.schedule(3, cases), 400))
    assert {k for _, k in a} == set(soak.NORMAL_KINDS) | set(soak.LL_KINDS)


def _rank(rank, calls, mismatches=0, drift=0.0):
    return dict(rank=rank, calls=calls, mismatches=mismatches, hangs=0,
                drift=dict(allocated=drift, reserved=0.0, device_used=0.0, rss=-drift))


def test_drift_and_the_summary_of_a_cut_run():
    soak = pytest.importorskip("soak")
    assert sc.drift([100, 100, 101]) == pytest.approx(0.01) and sc.drift([5]) == 0.0
    args = type("A", (), dict(ranks=2, seed=1, cases=4, calls=100, time_limit=10.0))()
    ranks = [_rank(0, 40, mismatches=1, drift=0.03), dict(rank=1, complete=False, error="no progress written")]
    out = soak.summarize(ranks, args, complete=False, error="SpawnError: rank 1 did not finish within 40s")
    # calls: what every rank made (rank 1 reported nothing), not the sum over ranks
    assert (out["calls"], out["calls_per_rank"], out["mismatches"], out["hangs"]) == (0, [40, 0], 1, 1)
    assert out["max_drift"]["rss"] == pytest.approx(0.03)
    assert not out["passed"] and not out["complete"] and not out["drift_ok"] and not out["target_reached"]


@pytest.mark.parametrize("ranks,passed,failing", [
    ([_rank(0, 120), _rank(1, 118)], True, []),
    ([_rank(0, 120), _rank(1, 60)], False, ["target_reached"]),           # stopped by the time limit
    ([_rank(0, 120), _rank(1, 120, drift=0.011)], False, ["drift_ok"]),   # memory not flat
    ([_rank(0, 120, mismatches=2), _rank(1, 120)], False, ["no_mismatch"]),
])
def test_a_complete_run_passes_only_with_every_condition(ranks, passed, failing):
    """A run the time limit stopped short of --calls, or with a drift over 1%, does not pass
    (it used to: only mismatches and hangs were counted, and calls were summed over ranks)."""
    soak = pytest.importorskip("soak")
    args = type("A", (), dict(ranks=2, seed=1, cases=4, calls=118, time_limit=10.0))()
    out = soak.summarize(ranks, args, complete=True)
    assert out["passed"] is passed
    assert [k for k in ("complete", "target_reached", "no_mismatch", "no_hang", "drift_ok") if not out[k]] == failing
    assert out["calls"] == min(r["calls"] for r in ranks)


def test_time_limits_leave_the_json_inside_the_limit():
    """The ranks stop calling 45 s before --time-limit and the spawn is ended 15 s before it,
    counted from the script's start: a hang still leaves time to write the JSON before an outer
    `timeout` of --time-limit (gpu_session.sh) kills the script."""
    soak = pytest.importorskip("soak")
    deadline, timeout = soak.limits(1000.0, 540.0, now=1004.0)   # 4 s of imports and the GPU probe
    assert deadline == 1000.0 + 540.0 - 45.0
    assert 1004.0 + timeout == 1000.0 + 540.0 - 15.0 and deadline < 1004.0 + timeout
    with pytest.raises(ValueError, match="time-limit"):
        soak.limits(1000.0, 50.0, now=1000.0)


def test_the_layout_check_passes_the_reference_and_catches_a_wrong_count():
    """get_dispatch_layout's outputs are hashed against the reference's layout: equal values hash
    equal whatever the integer dtype, and one wrong count or flag is caught."""
    R = 2
    case = sc.Case(0, "normal", 9, (7, 5), 256, 3, 8, False, 0.2)
    inp = sc.case_inputs(case, R)
    for d in range(R):
        want = sc.hash_parts(sc.reference_layout(case, R, inp, d, device="cpu"))
        lay = sc.reference_layout(case, R, inp, d, device="cpu")
        got = sc.layout_parts(lay["layout_per_rank"].to(torch.int64), lay["layout_per_expert"],
                              lay["layout_in_rank"])
        assert sc.hash_parts(got) == want
        bad = dict(got, layout_per_expert=got["layout_per_expert"].clone())
        bad["layout_per_expert"][0] += 1
        assert [k for k, v in sc.hash_parts(bad).items() if want[k] != v] == ["layout_per_expert"]
        flip = dict(got, layout_in_rank=~got["layout_in_rank"])
        assert [k for k, v in sc.hash_parts(flip).items() if want[k] != v] == ["layout_in_rank"]


def test_a_low_latency_mismatch_is_described_element_by_element():
    """diff_ll names what differs from the reference: a flipped bit (index, both values and
    bits), and rows received that the routing did not send (the counts, the extra rows' source
    tokens and payload); nothing for the reference itself."""
    R = 2
    case = sc.Case(1, "ll", 11, (3, 4), 256, 2, 4, True, 0.0, T=4)
    ref = sc.ll_reference(case, R, sc.case_inputs(case, R), partials=True)
    r = ref["dispatch"][0]
    parts = sc.ll_parts((_t(r.recv_x), _t(r.recv_x_scales)), _t(r.recv_count), _t(r.handle.src_info),
                        _t(r.handle.layout_range))
    out = _t(ref["combine"][0])
    assert sc.diff_ll(parts, out, ref, 0) == {}
    j = int(np.argmax(r.recv_count))
    bad = sc.diff_ll(dict(parts, recv_x=_flip(parts["recv_x"], (j, 0, 1))), out, ref, 0)
    assert list(bad) == ["recv_x"]
    rec = bad["recv_x"]
    assert rec["differ"] == 1 and rec["rows"] == [[j, 0]] and rec["first"][0][0] == [j, 0, 1]
    got, want = rec["first"][0][1:]
    assert got != want and got.endswith(")") and "(0x" in want
    # One extra row in expert j: its count, range and source token differ, and its payload.
    c = int(r.recv_count[j])
    cnt, src, x = parts["count"].clone(), parts["src_info"].clone(), parts["recv_x"].clone()
    cnt[j] += 1
    src[j, c] = 3
    x[j, c] = x[j, 0]
    extra = sc.diff_ll(dict(parts, count=cnt, src_info=src, recv_x=x), out, ref, 0)
    assert extra["counts"] == [[j, c + 1, c]]
    assert extra["src_info"]["first"] == [[[j, c], 3, int(r.handle.src_info[j, c])]]
    assert extra["recv_x"]["rows"] == [[j, c]]
    assert set(extra) == {"count", "counts", "src_info", "recv_x"}
    assert list(sc.diff_ll(parts, _flip(out, (1, 2)), ref, 0)) == ["combined_x"]


def test_a_normal_mismatch_is_described_element_by_element():
    R = 2
    case = sc.Case(0, "normal", 7, (5, 3), 256, 3, 8, False, 0.2)
    ref = sc.normal_reference(case, R, sc.case_inputs(case, R))
    d = next(d for d in range(R) if ref["dispatch"][d].handle.num_recv_tokens)
    M = ref["dispatch"][d].handle.num_recv_tokens
    res, comb = _normal_results(ref, d, garbage_rows=True)
    parts = sc.normal_parts(res, M)
    assert sc.diff_normal(parts, comb, ref, d) == {}
    bad = sc.diff_normal(dict(parts, recv_x=_flip(parts["recv_x"], (M - 1, 5))), comb, ref, d)
    assert list(bad) == ["recv_x"] and bad["recv_x"]["first"][0][0] == [M - 1, 5]
    wrong = sc.diff_normal(dict(parts, experts=[n + 1 for n in parts["experts"]]), None, ref, d)
    assert wrong["experts"]["differ"] == len(parts["experts"])
    # a cached dispatch (rows only) and a combine alone (no parts)
    assert sc.diff_normal({"recv_x": parts["recv_x"]}, None, ref, d) == {}
    assert list(sc.diff_normal({}, (_flip(comb[0], (0, 0)), comb[1]), ref, d)) == ["combined_x"]


def test_the_soak_records_the_first_mismatches_in_detail(monkeypatch):
    """Soak._explain: the first DETAIL_LIMIT mismatches of a rank get the elements that differ,
    the call's kind, slot, the slots' tags and the low-latency call before; later ones only
    their parts (in mismatch_detail); every low-latency call becomes the previous one."""
    soak = pytest.importorskip("soak")
    R = 2
    case = sc.Case(1, "ll", 11, (3, 4), 256, 2, 4, False, 0.0, T=4)
    ref = sc.ll_reference(case, R, sc.case_inputs(case, R), partials=True)
    s = object.__new__(soak.Soak)
    s.rank, s.details, s.prev_ll = 0, [], None
    monkeypatch.setattr(s, "_reference", lambda c: (None, ref), raising=False)
    monkeypatch.setattr(s, "_ll_tags", lambda: {"dispatch": [7, 7], "combine": [6, 7], "failed": 0}, raising=False)
    r = ref["dispatch"][0]
    parts = sc.ll_parts(_t(r.recv_x), _t(r.recv_count), _t(r.handle.src_info), _t(r.handle.layout_range))
    cnt = parts["count"].clone()
    cnt[0] += 1
    out = _t(ref["combine"][0])
    s._explain([], 10, case, "eager", parts, out, 0)
    assert s.details == [] and s.prev_ll == [10, 1, "eager", 0]
    for call in range(12, 12 + 2 * soak.DETAIL_LIMIT + 2, 2):
        s._explain(["count"], call, case, "hook", dict(parts, count=cnt), out, 1)
    assert len(s.details) == soak.DETAIL_LIMIT
    first = s.details[0]
    assert (first["call"], first["case"], first["kind"], first["slot"], first["parts"]) == (12, 1, "hook", 1, ["count"])
    assert first["previous_ll"] == [10, 1, "eager", 0] and first["tags"]["dispatch"] == [7, 7]
    assert first["diff"]["counts"] == [[0, int(r.recv_count[0]) + 1, int(r.recv_count[0])]]
    assert s.details[1]["previous_ll"] == [12, 1, "hook", 1]
    import json
    assert json.loads(json.dumps(s.details)) == s.details  # what the per-rank JSON holds
