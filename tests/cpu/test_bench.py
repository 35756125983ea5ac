"""`epcomm bench` without a GPU: the accounting, DeepEP's size hints, the JSON written after each
mode (a failed mode recorded with what its ranks had saved), the table on the stored results and
on a new-format dict, the start aligner's fallback, the result checks (against epcomm.reference,
on CPU tensors standing in for the GPU's), the knobs of the benchmark and of the GPU tests; the
project's bars (benchmarks/bars.py) computed from result dicts; benchmarks/host_overhead.py's
driver."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from epcomm import envs, interop, reference
from epcomm.kernels import timing as K
from epcomm.kernels.intranode import nvl_buffer_size_hint
from epcomm.kernels.low_latency import rdma_size_hint
from epcomm.testing import random_topk
from epcomm.tools import bench, cli, spawn
from epcomm.tools.bench import defaults, driver, knobs

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def _load_script(name: str, argv=()):
    """benchmarks/<name>.py as a module (``argv``: the sys.argv it sees while it loads)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    saved = sys.argv
    sys.argv = [f"{name}.py", *argv]
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.argv = saved
    return mod


bars = _load_script("bars")
BENCH_FILES = ("nvidia-h200-x2.json", "nvidia-h200-x2-12sms.json", "nvidia-h200-x2-low-latency.json",
               "nvidia-h200-x4.json", "nvidia-h200-x4-normal.json")


# ----------------------------------------------------------------------------- accounting, hints


def test_accounting_follows_the_guide():
    assert bench.normal_row_bytes(7168) == {"bf16": 14336, "fp8": 7168 + 56 * 4}
    assert bench.ll_row_bytes(7168) == {"dispatch": 7168 + 56 * 4 + 16, "combine": 14336}
    # The stored 2-GPU run: 8160 received rows in 342.7 us is DeepEP's 341 GB/s.
    assert bench.gbps(8160 * 14336, 342.7) == pytest.approx(341.3, abs=0.1)
    # Low-latency: 1024 selections of 7408 bytes in 25 us.
    assert bench.gbps(1024 * 7408, 25.0) == pytest.approx(303.4, abs=0.1)
    assert math.isnan(bench.gbps(1, 0.0)) and math.isnan(bench.gbps(1, float("nan")))


def test_deepep_low_latency_size_hint():
    # DeepEP's figure for this shape, for 2, 4 and 8 ranks (the rank count does not enter its formula).
    for R in (2, 4, 8):
        assert round(bench.deepep_ll_rdma_size_hint(128, 7168, R, 256) / 1e6, 1) == 1908.4
    # A shape small enough to follow by hand: messages 16 + max(256, 132) = 272 and 4 + 256 = 260;
    # send max(272, 2 * 260) = 520, receive max(2 * 272, 520) = 544, signalling align(8, 128) = 128;
    # 2 * (520 + 544 + 128) = 2384, then DeepEP's "(n + 128) / 128 * 128" = 2432.
    assert bench.deepep_ll_rdma_size_hint(1, 128, 2, 2) == 2432
    # epcomm's own hint is the heap layout's total, and the breakdown adds up to it.
    for R in (2, 4):
        b = bench.heap_breakdown(128, 7168, 256, R)
        parts = sum(v for k, v in b.items() if k not in ("total", "message_bytes"))
        assert parts == b["total"] == rdma_size_hint(128, 7168, R, 256)
        assert b["total"] < bench.deepep_ll_rdma_size_hint(128, 7168, R, 256)


def test_deepep_nvlink_size_hint():
    # DeepEP's hint: about 336 MB at R=8, 20 SMs, H 7168.
    assert round(bench.deepep_nvl_buffer_size_hint(7168, 8) / 1e6) == 336


def test_nvshmem_size_text():
    assert bench.parse_size("1443000000") == 1443000000
    assert bench.parse_size("2G") == 2 << 30 and bench.parse_size("512m") == 512 << 20
    assert bench.parse_size("") is None and bench.parse_size("lots") is None


# ----------------------------------------------------------------------------- bars


def _normal_rank(rank, per_sms):
    """per_sms: {sms: {op: GB/s}}."""
    return {"rank": rank, "sms": {str(s): {f"{op}_GBps": v for op, v in ops.items()} for s, ops in per_sms.items()}}


def _synthetic(world=2):
    sms = (8, 12, 16, 24, 32)
    # At 24 SMs one rank is fast and the other slow: the slowest rank's best is at 16 SMs.
    bf16 = ({8: 300, 12: 345, 16: 445, 24: 600, 32: 600}, {8: 310, 12: 335, 16: 445, 24: 420, 32: 700})
    cached = ({8: 350, 12: 360, 16: 430, 24: 470, 32: 500}, {8: 340, 12: 355, 16: 440, 24: 455, 32: 520})
    ranks = []
    for r in range(world):
        per = {}
        for s in sms:
            per[s] = {"dispatch_bf16": bf16[r % 2][s], "cached_dispatch_bf16": cached[r % 2][s],
                      "dispatch_fp8": 250.0 + s, "dispatch_fp8_colmajor": 240.0 + s,
                      "cached_dispatch_fp8": 300.0 + s, "combine": 420.0 + s}
        ranks.append(_normal_rank(r, per))
    ll = []
    for r, (d, c) in enumerate(((20.0, 25.0), (23.0, 29.0))[:world] if world <= 2 else [(20.0, 25.0)] * world):
        ll.append({"rank": r, "dispatch_graph_us_back_to_back": d, "combine_graph_us_back_to_back": c,
                   "dispatch_graph_us": d + 10, "combine_graph_us": c + 10, "host_us_per_dispatch": 9.0 + r,
                   "host_us_per_combine": 14.0 + 2 * r, "rdma_bytes": 1068040192,
                   "heap": {"nvshmem_symmetric_size": 1443288422}})
    return {"meta": {"world_size": world, "gpus": f"{world}x fake", "commit": "abc"},
            "normal": {"args": dict(bars.NORMAL_SETTING, sms=list(sms), iters=30), "ranks": ranks},
            "low_latency": {"args": dict(bars.LL_SETTING, iters=30), "ranks": ll}}


def _entry(entries, bar_prefix, field):
    hits = [e for e in entries if e["bar"].startswith(bar_prefix) and e["field"] == field]
    assert len(hits) == 1, (bar_prefix, field, [(e["bar"], e["field"]) for e in entries])
    return hits[0]


def test_normal_bars_use_the_slowest_rank_at_the_best_allowed_sm_count():
    b = bars.compute_bars(_synthetic(2))["normal"]
    e = b["entries"]
    # <= 24 SMs: per-SM minimum over ranks 300, 335, 445, 420 (32 SMs, 600, is not allowed).
    full = _entry(e, "at most 24 SMs", "dispatch_bf16_GBps")
    assert (full["value_GBps"], full["at_sms"], full["pass"]) == (445, 16, False)
    assert full["threshold_GBps"] == 450 and full["per_rank_GBps"] == [445, 445]
    assert "full dispatch" in full["timing"]
    cached = _entry(e, "at most 24 SMs", "cached_dispatch_bf16_GBps")
    assert (cached["value_GBps"], cached["pass"]) == (455, True) and "cached" in cached["timing"]
    # <= 12 SMs: only 8 and 12 qualify.
    twelve = _entry(e, "at most 12 SMs", "dispatch_bf16_GBps")
    assert (twelve["value_GBps"], twelve["at_sms"], twelve["threshold_GBps"], twelve["pass"]) == (335, 12, 340, False)
    assert _entry(e, "at most 12 SMs", "cached_dispatch_bf16_GBps")["value_GBps"] == 355
    assert _entry(e, "at most 24 SMs", "combine_GBps")["pass"] is True       # 444 >= 400
    assert _entry(e, "stretch", "combine_GBps")["pass"] is True              # 444 >= 440
    assert _entry(e, "at most 24 SMs", "dispatch_fp8_colmajor_GBps")["value_GBps"] == 264
    # Every op of every bar is reported, with both dispatch timings.
    assert len(e) == 3 * (2 + 3 + 1)


def test_normal_bars_for_four_gpus_and_other_counts():
    b = bars.compute_bars(_synthetic(4))["normal"]
    assert {e["bar"] for e in b["entries"]} == {"at most 24 SMs: 1.3x DeepEP V1"}
    assert _entry(b["entries"], "at most 24 SMs", "combine_GBps")["threshold_GBps"] == 465
    res = _synthetic(4)
    res["meta"]["world_size"] = 8
    assert bars.compute_bars(res)["normal"]["entries"] == [] and "8" in bars.compute_bars(res)["normal"]["note"]


def test_normal_bar_not_measured_when_a_rank_is_missing():
    res = _synthetic(2)
    res["normal"]["ranks"] = res["normal"]["ranks"][:1]  # a failed spawn's partial results
    e = bars.compute_bars(res)["normal"]["entries"]
    assert all(x["pass"] is None and x["value_GBps"] is None for x in e)


def test_low_latency_bars():
    b = bars.compute_bars(_synthetic(2))["low_latency"]
    e = b["entries"]
    d = _entry(e, "dispatch <= 22", "dispatch_graph_us_back_to_back")
    assert (d["value_us"], d["pass"]) == (23.0, False) and "back to back" in d["timing"]
    assert _entry(e, "dispatch <= 22", "dispatch_graph_us")["value_us"] == 33.0
    assert _entry(e, "combine <= 30", "combine_graph_us_back_to_back")["pass"] is True
    assert _entry(e, "stretch: combine <= 20", "combine_graph_us_back_to_back")["pass"] is False
    host = _entry(e, "host time per combine", "host_us_per_combine")
    assert (host["value_us"], host["pass"]) == (16.0, False)
    assert _entry(e, "host time per dispatch", "host_us_per_dispatch")["pass"] is True
    heap = _entry(e, "symmetric-heap bytes <= DeepEP's size hint (buffer", "rdma_bytes")
    assert heap["pass"] is True and round(heap["threshold_bytes"] / 1e6, 1) == 1908.4
    assert _entry(e, "symmetric-heap bytes <= DeepEP's size hint (heap", "nvshmem_symmetric_size")["pass"] is True
    # 4 GPUs: 26 / 42 us and no stretch bars.
    b4 = bars.compute_bars(_synthetic(4))["low_latency"]["entries"]
    assert _entry(b4, "dispatch <= 26", "dispatch_graph_us")["threshold_us"] == 26
    assert not [x for x in b4 if x["bar"].startswith("stretch")]


def test_bars_of_an_older_file():
    res = json.loads((RESULTS / "nvidia-h200-x2.json").read_text())
    b = bars.compute_bars(res)
    host = _entry(b["low_latency"]["entries"], "host time per combine", "host_us_per_combine")
    r = res["low_latency"]["ranks"]
    assert host["value_us"] == pytest.approx(max(x["host_us_per_combine_plus_dispatch"] - x["host_us_per_dispatch"]
                                                 for x in r))
    full = _entry(b["normal"]["entries"], "at most 24 SMs", "dispatch_bf16_GBps")
    assert full["at_sms"] == 24 and full["value_GBps"] == pytest.approx(
        min(x["sms"]["24"]["dispatch_bf16_GBps"] for x in res["normal"]["ranks"]))


# ----------------------------------------------------------------------------- run(): JSON after each mode


def _ll_ranks():
    return [{"rank": r, "dispatch_graph_us_back_to_back": 20.0, "combine_graph_us_back_to_back": 28.0,
             "host_us_per_dispatch": 9.0, "host_us_per_combine": 12.0, "rdma_bytes": 1068040192,
             "check": {"dispatch": "ok", "combine": "ok"}, "env": {"EPCOMM_CHECK_INDICES": "0"}} for r in range(2)]


@pytest.fixture
def two_fake_gpus(monkeypatch):
    monkeypatch.setenv("EPCOMM_VISIBLE_GPUS", "2")
    monkeypatch.setenv("EPCOMM_GIT_COMMIT", "feedbeef")
    monkeypatch.setattr(driver, "gpu_name", lambda: "2x fake")


def test_a_failed_mode_is_recorded_with_its_partial_results_and_the_next_mode_runs(tmp_path, monkeypatch,
                                                                                   two_fake_gpus):
    seen = []

    def fake_run(fn, n, args, timeout, env):
        assert env == bench.WORKER_ENV == {"EPCOMM_CHECK_INDICES": "0"}  # the workers' host checks off
        if fn is bench.normal_worker:
            # Rank 0 had saved its results up to the failing section (bench.Progress).
            with open(os.path.join(args["partial_dir"], "normal.0.json"), "w") as f:
                json.dump({"rank": 0, "sms": {"24": {"dispatch_bf16_us": 300.0}}, "check": {}}, f)
            raise spawn.SpawnError("rank 1 did not finish within 200s: stalled in phase 'combine sms=24'")
        return _ll_ranks()
    monkeypatch.setattr(spawn, "run", fake_run)
    path = tmp_path / "bench.json"
    res = bench.run("all", 0, json_path=str(path), timeout=200,
                    report=lambda r, key: seen.append((key, json.loads(path.read_text()))))
    assert [k for k, _ in seen] == ["normal", "low_latency"]
    first = seen[0][1]
    assert "stalled in phase 'combine sms=24'" in first["normal"]["error"] and first["normal"]["partial"]
    assert first["normal"]["ranks"][0]["sms"]["24"]["dispatch_bf16_us"] == 300.0
    assert "low_latency" not in first
    # The bars are the project's, computed from the JSON by benchmarks/bars.py, not written by the
    # library: from the first mode's file already (nothing measured on every rank yet).
    assert "bars" not in first
    first_bars = bars.compute_bars(first)
    assert set(first_bars) == {"normal"} and first_bars["normal"]["entries"]
    assert all(e["pass"] is None for e in first_bars["normal"]["entries"])
    final = json.loads(path.read_text())
    assert final == json.loads(json.dumps(res, default=str))
    assert final["low_latency"]["check"] == {"dispatch": "ok", "combine": "ok"}
    assert final["meta"]["worker_env"]["low_latency"] == {"EPCOMM_CHECK_INDICES": "0"}
    assert final["meta"]["commit"] == "feedbeef" and final["meta"]["aligner"] == "clock"
    # The NVLink buffer this shape needs, beside DeepEP's hint (about 336 MB at R=8).
    nvl = final["normal"]["nvl_buffer"]
    assert nvl["epcomm_bytes_by_ranks"]["8"] == nvl_buffer_size_hint(7168, 8, 4096, 8)
    assert round(nvl["deepep_hint_bytes_by_ranks"]["8"] / 1e6) == 336
    assert "bars" not in final
    assert _entry(bars.compute_bars(final)["low_latency"]["entries"], "combine <= 30",
                  "combine_graph_us_back_to_back")["pass"]
    # The partial dirs are gone.
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("epcomm-bench-*/normal.0.json"))


def test_json_of_a_finished_mode_survives_an_interrupted_later_mode(tmp_path, monkeypatch, two_fake_gpus):
    def fake_run(fn, n, args, timeout, env):
        if fn is bench.ll_worker:
            raise KeyboardInterrupt  # e.g. the outer time limit: not caught, the process ends
        return [{"rank": r, "sms": {"24": {"dispatch_bf16_GBps": 400.0}}, "check": {"combine": "ok"}}
                for r in range(2)]
    monkeypatch.setattr(spawn, "run", fake_run)
    path = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        bench.run("all", 0, json_path=str(path))
    got = json.loads(path.read_text())
    assert got["normal"]["ranks"][1]["sms"]["24"]["dispatch_bf16_GBps"] == 400.0 and "low_latency" not in got


def test_run_rejects_bad_arguments_before_spawning(monkeypatch, two_fake_gpus):
    monkeypatch.setattr(spawn, "run", lambda *a, **k: pytest.fail("spawned"))
    for kw, words in ((dict(aligner="cycles"), "--aligner"), (dict(sms=()), "--sms"), (dict(iters=0), "--iters")):
        with pytest.raises(ValueError, match=words):
            bench.run("normal", 0, **kw)


def test_cli_default_sm_sweep_includes_12(monkeypatch):
    assert bench.DEFAULT_SMS == (8, 12, 16, 24, 32)
    r = subprocess.run([sys.executable, "-m", "epcomm.tools.cli", "bench", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0 and "8,12,16,24,32" in r.stdout and "--aligner" in r.stdout
    # The help names the benchmark's own variables, and no project goals.
    words = set(r.stdout.lower().replace("'", " ").split())
    assert all(k in r.stdout for k in knobs.KNOBS) and not words & {"issue", "issues", "issue's", "bar", "bars"}
    # The CLI's defaults are the benchmark's constants, not copies of them.
    seen = []
    monkeypatch.setattr(driver, "main", lambda a: seen.append(a) or 0)  # the module the CLI runs
    assert cli.main(["bench", "all"]) == 0
    a = seen[0]
    assert a.sms is defaults.DEFAULT_SMS and a.tokens is None and a.gpus == 0 and a.json is None
    # --iters is per mode (None): ITERS, or SHARED_GPU_ITERS for internode ranks sharing a GPU.
    assert (a.hidden, a.topk, a.experts, a.iters, a.timeout, a.aligner) == (
        defaults.HIDDEN, defaults.TOPK, defaults.EXPERTS, None, defaults.SPAWN_TIMEOUT_S, "clock")
    assert (defaults.HIDDEN, defaults.TOPK, defaults.EXPERTS, defaults.ITERS, defaults.SPAWN_TIMEOUT_S) == (
        7168, 8, 256, 30, 540.0)
    assert (defaults.NORMAL_TOKENS, defaults.LL_TOKENS, defaults.ALIGNER_MODES) == (4096, 128, ("clock", "wall"))
    assert bench.Aligner.MODES is defaults.ALIGNER_MODES


def test_the_library_benchmark_holds_no_project_goals():
    src = "".join(p.read_text() for p in sorted((ROOT / "epcomm" / "tools" / "bench").glob("*.py")))
    assert "issue" not in src.lower()
    for name in ("NORMAL_BARS", "LL_BARS", "LL_STRETCH", "HOST_BAR_US", "BAR_FIELDS", "compute_bars", "print_bars"):
        assert name not in src and not hasattr(bench, name), name


def test_benchmark_and_test_knobs_are_typed_and_not_the_librarys(monkeypatch):
    import gpu_checks
    assert set(knobs.KNOBS) == {"EPCOMM_GIT_COMMIT", "EPCOMM_BENCH_KIND"}
    assert set(gpu_checks.KNOBS) == {"EPCOMM_TEST_RANKS", "EPCOMM_TEST_TIMEOUT", "EPCOMM_TEST_LOG_DIR",
                                     "EPCOMM_TEST_FUZZ_SEED"}
    assert not set(envs.KNOBS) & (set(knobs.KNOBS) | set(gpu_checks.KNOBS))
    for name in (*knobs.KNOBS, *gpu_checks.KNOBS):
        monkeypatch.delenv(name, raising=False)
    assert (gpu_checks.TEST_RANKS.get(), gpu_checks.TEST_TIMEOUT.get(), gpu_checks.TEST_LOG_DIR.get(),
            gpu_checks.TEST_FUZZ_SEED.get()) == (0, 480.0, "", 1)
    assert (knobs.GIT_COMMIT.get(), knobs.BENCH_KIND.get()) == ("", "")
    monkeypatch.setenv("EPCOMM_TEST_RANKS", "0x4")
    monkeypatch.setenv("EPCOMM_TEST_TIMEOUT", "12.5")
    monkeypatch.setenv("EPCOMM_BENCH_KIND", "nvidia-h200")
    assert (gpu_checks.TEST_RANKS.get(), gpu_checks.TEST_TIMEOUT.get(), knobs.BENCH_KIND.get()) == (4, 12.5, "nvidia-h200")
    monkeypatch.setenv("EPCOMM_TEST_RANKS", "four")
    with pytest.raises(ValueError, match="EPCOMM_TEST_RANKS='four'"):
        gpu_checks.TEST_RANKS.get()
    with pytest.raises(ValueError, match="declared twice"):
        envs.knob("EPCOMM_BENCH_KIND", "", envs.parse_str, "again", registry=knobs.KNOBS)


def test_a_knob_scoped_to_a_block_is_restored_after_it(monkeypatch):
    monkeypatch.delenv("EPCOMM_CHECK_INDICES", raising=False)
    with envs.CHECK_INDICES.scoped(False):
        assert os.environ["EPCOMM_CHECK_INDICES"] == "0" and envs.CHECK_INDICES.get_memo() is False
    assert "EPCOMM_CHECK_INDICES" not in os.environ and envs.CHECK_INDICES.get_memo() is True
    monkeypatch.setenv("EPCOMM_CHECK_INDICES", "off")
    with pytest.raises(KeyError):
        with envs.CHECK_INDICES.scoped(True):
            assert os.environ["EPCOMM_CHECK_INDICES"] == "1" and envs.CHECK_INDICES.get() is True
            raise KeyError("the block raised")
    assert os.environ["EPCOMM_CHECK_INDICES"] == "off"
    with envs.TIMEOUT_S.scoped(2.5):
        assert envs.TIMEOUT_S.get() == 2.5


def test_worker_setup_refuses_a_worker_spawned_without_the_worker_env(monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.delenv("EPCOMM_CHECK_INDICES", raising=False)  # the library's default: checks on
    with pytest.raises(RuntimeError, match="WORKER_ENV"):
        bench.worker_setup(0, 1, None)


# ----------------------------------------------------------------------------- the table


@pytest.mark.parametrize("name", BENCH_FILES)
def test_print_table_on_stored_results(name, capsys):
    res = json.loads((RESULTS / name).read_text())
    bench.print_table(res)
    out = capsys.readouterr().out
    assert f"commit {res['meta']['commit']}" in out
    if "normal" in res:
        assert "normal mode" in out and "dispatch_bf16" in out
        assert "older runs' 'same payload'" in out  # the old even-split field, labelled
    if "low_latency" in res:
        assert "dispatch_us" in out and "DeepEP's hint for this shape 1908.4 MB" in out
    assert "!!!" not in out and "bars," not in out  # the bars are benchmarks/bars.py's
    bars.print_bars(bars.compute_bars(res))
    out = capsys.readouterr().out
    if "normal" in res:
        assert "bars, normal" in out
    if "low_latency" in res:
        assert "bars, low_latency" in out


def test_bars_script_prints_and_writes_the_bars_of_a_results_file(tmp_path, capsys):
    src = RESULTS / "nvidia-h200-x2.json"
    out_json = tmp_path / "bars.json"
    assert bars.main([str(src), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert f"# bars of {src}" in out and "bars, normal" in out and "bars, low_latency" in out
    expected = bars.compute_bars(json.loads(src.read_text()))
    assert json.loads(out_json.read_text()) == json.loads(json.dumps(expected))
    assert out.count("PASS") + out.count("FAIL") + out.count("  -- ") == sum(
        len(b["entries"]) for b in expected.values())


def test_print_table_on_the_ab_files(capsys):
    files = json.loads((RESULTS / "nvidia-h200-x2-error-record-ab.json").read_text())["files"]
    assert {k for res in files.values() for k in ("normal", "low_latency") if k in res} == {"normal", "low_latency"}
    headers = 0
    for res in files.values():
        bench.print_table(res)
        out = capsys.readouterr().out
        headers += out.count("# epcomm bench")
        assert f"commit {res['meta']['commit']}" in out and "!!!" not in out
        for key, title in (("normal", "normal mode"), ("low_latency", "low-latency")):
            if key not in res:
                assert f"\n{title}: " not in out
                continue
            a, n = res[key]["args"], len([r for r in res[key]["ranks"] if r])
            assert f"\n{title}: {a['tokens']} tokens/rank, hidden {a['hidden']}" in out
            assert f"mean [min-max] over {n} rank(s)" in out
        if "normal" in res:  # a row per SM count measured, with its GB/s
            for s in bench.sms_counts(res["normal"]):
                assert any(line.split()[:2] == [str(s), "dispatch_bf16"] for line in out.splitlines()), s
        if "low_latency" in res:
            assert "dispatch_graph_us_back_to_back" in out and "DeepEP's hint for this shape 1908.4 MB" in out
    assert headers == len(files)


def test_print_table_new_format_shows_min_max_failures_and_bars(capsys):
    res = _synthetic(2)
    for r in res["normal"]["ranks"]:
        r["sms"]["24"]["dispatch_bf16_us"] = 300.0 + r["rank"]
        r["check"] = {"dispatch_bf16": "ok", "combine": "ok" if r["rank"] else "sms=24: combined_x: 3 of 9 differ"}
        r["nccl_dispatch_bf16_us"], r["nccl_dispatch_bf16_GBps"] = 130.0, 900.0
        r["nccl_even_a2a_us"], r["nccl_even_a2a_offrank_GBps"] = 125.0, 234.0
        r["aligner"] = {"mode": "wall", "requested": "clock", "barriers": 4, "aligned": 0,
                        "fallback": {"after_barriers": 4, "aligned_per_rank": [0, 0], "switched_to": "wall"}}
    bench.summarize_mode(res, "normal")
    res["low_latency"]["error"] = "SpawnError: rank 0 failed: EpcommTimeoutError: ..."
    bench.print_table(res)
    out = capsys.readouterr().out
    assert "300.5 [300.0-301.0]" in out                  # mean [min-max] over ranks
    assert "!!! CHECK FAILED normal combine: rank 0: sms=24: combined_x" in out
    assert "!!! low_latency FAILED: SpawnError" in out
    assert "NCCL all_to_all_single, same payload" in out and "even split of N x H bf16" in out
    assert "fell back" in out
    bars.print_bars(bars.compute_bars(res))
    out = capsys.readouterr().out
    assert "FAIL at most 24 SMs: 1.3x DeepEP V1: dispatch_bf16_GBps = 445.0 GB/s at 16 SMs (bar 450 GB/s)" in out
    assert "PASS" in out


# ----------------------------------------------------------------------------- the start aligner


def test_clock_failure_rule():
    assert bench.clock_failed([0, 0], 4) and bench.clock_failed([4, 1], 4)
    assert not bench.clock_failed([4, 2], 4) and not bench.clock_failed([4, 4], 4)


class _FakeCuda:
    def synchronize(self):
        pass

    def current_stream(self):
        return SimpleNamespace(cuda_stream=7)


def test_time_op_records_event_and_host_times_per_timed_call():
    import time

    class _Ev:
        def __init__(self, enable_timing=False):
            pass

        def record(self):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 0.25  # ms

    torch = SimpleNamespace(cuda=SimpleNamespace(Event=_Ev, synchronize=lambda: None))
    calls, aligned, host = [], [], []
    ts = bench.time_op(torch, lambda: (calls.append(1), time.sleep(0.002)), 3, 2, lambda: aligned.append(1), host)
    assert ts == [250.0] * 3 and len(calls) == 5 and len(aligned) == 5
    assert len(host) == 3 and all(h >= 2000.0 for h in host)  # the timed calls only, in us
    assert bench.time_op(torch, lambda: None, 2, 0, lambda: None) == [250.0] * 2  # host is optional


def _fake_aligner(aligned_here, aligned_peer, dist):
    """A 'clock' aligner with its GPU parts replaced: reports say aligned or not, launches are
    recorded, the group all-gather returns this rank's count and the peer's."""
    al = bench.Aligner.__new__(bench.Aligner)
    launches = []
    al.torch = SimpleNamespace(cuda=_FakeCuda(), zeros=lambda *a, **k: "one-element tensor")
    al.dist, al.mode, al.requested = dist, "clock", "clock"
    al.group = SimpleNamespace(allgather_bytes=lambda b: [b, str(aligned_peer).encode()])
    al._launch = lambda fn, threads, stream, p: launches.append(fn)
    al._sleep_us = 1500.0
    al._mod = SimpleNamespace(fn=lambda name: name)
    al.fallback, al.reports, al.opened, al.chan = None, [], [], 0
    al._fn, al._threads, al._p = "start_barrier", K.ALIGN_THREADS, K.AlignParams()
    al.report = SimpleNamespace(tolist=lambda: [0, 0, int(aligned_here)])
    al._probe = al.PROBE_BARRIERS
    return al, launches


def test_aligner_falls_back_to_wall_when_the_clock_barrier_does_not_align():
    reduced = []
    dist = SimpleNamespace(all_reduce=lambda t: reduced.append(t))
    al, launches = _fake_aligner(False, 0, dist)
    for _ in range(8):
        al()
    # Barriers 1-5 are clock barriers (the 4 reports are judged at the 5th call's start, so the
    # 5th already runs 'wall'), then all-reduce + wait.
    assert launches == ["start_barrier"] * 4 + ["spin_wait_ns"] * 4
    assert len(reduced) == 4
    s = al.summary()
    assert s["mode"] == "wall" and s["requested"] == "clock"
    assert s["fallback"] == {"after_barriers": 4, "aligned_per_rank": [0, 0], "switched_to": "wall"}
    assert s["barriers"] == 4 and s["aligned"] == 0


def test_aligner_keeps_the_clock_barrier_when_it_aligns_or_without_nccl():
    al, launches = _fake_aligner(True, 4, SimpleNamespace(all_reduce=lambda t: pytest.fail("all-reduce")))
    for _ in range(10):
        al()
    assert launches == ["start_barrier"] * 10 and "fallback" not in al.summary()
    assert al.summary()["aligned"] == 9
    # A peer that never aligned, but no NCCL group for 'wall': recorded, stays on 'clock'.
    al, launches = _fake_aligner(True, 0, None)
    for _ in range(6):
        al()
    assert launches == ["start_barrier"] * 6
    assert al.summary()["fallback"]["switched_to"] is None


# ----------------------------------------------------------------------------- checks (CPU tensors)


def _torch():
    return pytest.importorskip("torch")


def _bf16_np(torch, t):
    return interop.to_numpy(t)


def _normal_job(torch, R=2, N=48, H=256, E=8, K=4, seed=3):
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    per = []
    for _ in range(R):
        x = torch.randn(N, H, generator=gen).to(torch.bfloat16)
        per.append(dict(x=x, xq=x.float().clamp(-448, 448).to(torch.float8_e4m3fn),
                        xs=torch.rand(N, H // 128, generator=gen) + 0.5,
                        topk=torch.from_numpy(random_topk(rng, N, E, K)), w=torch.rand(N, K, generator=gen)))

    def gather(name, t):
        return torch.stack([p[name].view(torch.uint8) if name == "xq" else p[name] for p in per])
    return per, gather


def _as_result(torch, r: reference.DispatchResult, fp8: bool, col_scales: bool = False):
    """A reference result in the form Buffer.dispatch returns (torch tensors, a handle-like)."""
    data = interop.from_numpy("torch", r.recv_x.view(np.uint8) if fp8 else r.recv_x, "cpu")
    if fp8:
        data = data.view(torch.float8_e4m3fn)
        sc = torch.from_numpy(np.ascontiguousarray(r.recv_x_scales.T)).T if col_scales else \
            torch.from_numpy(r.recv_x_scales.copy())
        data = (data, sc)
    h = SimpleNamespace(recv_src_idx=torch.from_numpy(r.handle.recv_src_idx.copy()),
                        rank_prefix=torch.from_numpy(r.handle.rank_prefix.copy()),
                        recv_counts=tuple(int(v) for v in np.diff(r.handle.rank_prefix)))
    return (data, torch.from_numpy(r.recv_topk_idx.copy()), torch.from_numpy(r.recv_topk_weights.copy()),
            list(r.num_recv_tokens_per_expert_list), h, None)


def test_normal_check_accepts_the_reference_and_catches_differences():
    torch = _torch()
    R, E, rank = 2, 8, 1
    per, gather = _normal_job(torch, R=R, E=E)
    me = per[rank]
    chk = bench.NormalCheck(torch, gather, rank, R, me["x"], me["xq"], me["xs"], me["topk"], me["w"], E)
    assert chk.error is None
    kw = dict(topk_idx=[p["topk"].numpy() for p in per], topk_weights=[p["w"].numpy() for p in per])
    ref = reference.dispatch([_bf16_np(torch, p["x"]) for p in per], E, **kw)
    ref8 = reference.dispatch([interop.to_numpy(p["xq"]) for p in per], E,
                              x_scales=[p["xs"].numpy() for p in per], **kw)
    good = _as_result(torch, ref[rank], False)
    assert chk.dispatch(good, False, True) == "ok"
    assert chk.dispatch(_as_result(torch, ref8[rank], True), True, True) == "ok"
    assert chk.dispatch(_as_result(torch, ref8[rank], True, col_scales=True), True, True) == "ok"
    cached = (good[0], None, None, [], SimpleNamespace(), None)
    assert chk.dispatch(cached, False, False) == "ok"
    # One element of one row, a source index, a weight, a scale: each is caught and named.
    bad = good[0].clone()
    bad.view(torch.int16)[3, 5] ^= 1
    v = chk.dispatch((bad,) + good[1:], False, True)
    assert v.startswith("recv_x: 1 of") and "(3, 5)" in v
    h = good[4]
    h2 = SimpleNamespace(**{**vars(h), "recv_src_idx": h.recv_src_idx.flip(0)})
    assert "recv_src_idx" in chk.dispatch(good[:4] + (h2, None), False, True)
    w2 = good[2].clone()
    w2[0, 0] += 1
    assert "recv_topk_weights" in chk.dispatch(good[:2] + (w2,) + good[3:], False, True)
    f8 = _as_result(torch, ref8[rank], True)
    sc = f8[0][1].clone()
    sc[-1, -1] = 0.25
    assert "recv_x_scales" in chk.dispatch(((f8[0][0], sc),) + f8[1:], True, True)
    assert "rows received" in chk.dispatch((good[0][:-1],) + good[1:], False, True)
    # Combine: each destination d returns its rows times 2**d (combine_input); the reference's
    # fp32 sum in rank order, rounded to bf16, is what the check expects.
    y = chk.combine_input(good[0])
    assert torch.equal(y.float(), good[0].float() * 2 ** rank)
    ys = [(r.recv_x.astype(np.float32) * np.float32(2.0 ** d)).astype(reference.BF16) for d, r in enumerate(ref)]
    comb = interop.from_numpy("torch", reference.combine(ys, [r.handle for r in ref])[rank][0], "cpu")
    assert chk.combine(comb) == "ok"
    comb.view(torch.int16)[7, 100] ^= 1
    assert chk.combine(comb).startswith("combined_x: 1 of")


def test_a_check_whose_reference_failed_says_so_and_raises_nothing():
    torch = _torch()
    per, gather = _normal_job(torch)
    me = per[0]
    chk = bench.NormalCheck(torch, gather, 0, 2, me["x"], me["xq"], me["xs"], me["topk"], me["w"], 6)  # 6 % 4 != 0
    assert chk.error.startswith("reference not computed: ValueError")
    assert chk.dispatch(None, False, True) == chk.error and chk.combine(None) == chk.error
    chk = bench.NormalCheck(torch, gather, 0, 2, me["x"], me["xq"], me["xs"], me["topk"], me["w"], 8)
    assert chk.dispatch(None, False, True).startswith("check raised TypeError")


def test_low_latency_check_accepts_the_reference_and_catches_differences():
    torch = _torch()
    import ml_dtypes
    R, T, H, E, K, rank = 2, 16, 256, 8, 4, 0
    L = E // R
    rng = np.random.default_rng(5)
    gen = torch.Generator().manual_seed(5)
    per = [dict(x=torch.randn(T, H, generator=gen).to(torch.bfloat16),
                topk=torch.from_numpy(random_topk(rng, T, E, K)), w=torch.rand(T, K, generator=gen)) for _ in range(R)]

    def gather(name, t):
        return torch.stack([p[name] for p in per])
    me = per[rank]
    full = np.ones((R, R), dtype=bool)
    chk = bench.LLCheck(torch, gather, rank, R, me["x"], me["topk"], me["w"], T, E, partials=True,
                        pairs={False: ~full, True: full})
    assert chk.error is None
    xs = [_bf16_np(torch, p["x"]) for p in per]
    tks, ws = [p["topk"].numpy() for p in per], [p["w"].numpy() for p in per]
    ref = reference.low_latency_dispatch(xs, tks, T, E, use_fp8=True)
    r = ref[rank]
    data = torch.from_numpy(r.recv_x.view(np.uint8).copy())
    data[~torch.from_numpy(np.arange(R * T)[None, :] < r.recv_count[:, None])] = 0x7F  # unspecified rows
    data = data.view(torch.float8_e4m3fn)
    scales = torch.from_numpy(np.ascontiguousarray(r.recv_x_scales.transpose(0, 2, 1))).transpose(1, 2)
    cnt = torch.from_numpy(r.recv_count.copy())
    h = SimpleNamespace(src_info=torch.from_numpy(r.handle.src_info.copy()),
                        layout_range=torch.from_numpy(r.handle.layout_range.copy()))
    assert chk.dispatch((data, scales), cnt, h) == "ok"
    j, row = np.argwhere(np.arange(R * T)[None, :] < r.recv_count[:, None])[0]
    bad = data.view(torch.uint8).clone()
    bad[j, row, 9] ^= 1
    assert "recv_x rows" in chk.dispatch((bad.view(torch.float8_e4m3fn), scales), cnt, h)
    cnt2 = cnt.clone()
    cnt2[0] += 1
    assert chk.dispatch((data, scales), cnt2, h).startswith("recv_count")
    # The combine's input follows the documented recipe, and the expected sum is the reference's.
    ys = []
    for d, rd in enumerate(ref):
        y = np.zeros(rd.recv_x.shape, dtype=ml_dtypes.bfloat16)
        for jj in range(L):
            c = int(rd.recv_count[jj])
            deq = rd.recv_x[jj, :c].astype(np.float32) * np.repeat(rd.recv_x_scales[jj, :c], 128, axis=1)
            y[jj, :c] = (deq * np.float32(d + 1.5) * np.float32(1 + jj / 64)).astype(ml_dtypes.bfloat16)
        ys.append(y)
    assert np.array_equal(_bf16_np(torch, chk.y).view(np.int16), ys[rank].view(np.int16))
    for partials in (True, False):
        cref = reference.low_latency_combine(ys, tks, ws, [x.handle for x in ref], partials=partials)[rank]
        got = interop.from_numpy("torch", cref, "cpu")
        assert chk.combine(got, partials=partials) == "ok"
        got.view(torch.int16)[2, 3] ^= 1
        assert chk.combine(got, partials=partials).startswith("combined_x: 1 of")


def test_diff_and_check_records():
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    assert bench.diff("a", a, a.astype(np.int64)) == []   # integers of different widths: by value
    b = a.copy()
    b[1, 2] = 0
    assert bench.diff("a", b, a) == ["a: 1 of 6 elements differ from the reference (first at [1, 2]: got 0, expected 5)"]
    assert bench.diff("a", a[:1], a)[0].startswith("a: shape")
    f = np.array([0.0, np.nan], dtype=np.float32)
    assert bench.diff("f", f, f.copy()) == [] and bench.diff("f", -f, f) != []  # bitwise: -0 != +0
    checks = {}
    bench.record_check(checks, "combine", "ok", "sms=8")
    bench.record_check(checks, "combine", "combined_x: 1 of 9 elements differ", "sms=12")
    bench.record_check(checks, "combine", "ok", "sms=16")
    bench.record_check(checks, "combine", "later failure", "sms=24")
    assert checks == {"combine": "sms=12: combined_x: 1 of 9 elements differ"}


# ----------------------------------------------------------------------------- benchmarks/host_overhead.py


def test_host_overhead_help_names_its_options():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"), "--help"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    for opt in ("--epcomm-path", "--modes", "--normal-tokens", "--iters", "--warmup", "--json"):
        assert opt in r.stdout


def test_host_overhead_times_each_call_after_a_sync_and_keeps_failed_parts_apart():
    ho = _load_script("host_overhead")
    log = []
    med, fastest = ho._per_call(lambda: log.append("call"), 5, 2, lambda: log.append("sync"))
    assert log == ["sync", "call"] * 7 and 0 <= fastest <= med
    parts = {}
    ho._part(parts, "fine", lambda: 1.5)
    ho._part(parts, "gone", lambda: 1 / 0)
    assert parts == {"fine": 1.5, "gone": "unavailable: ZeroDivisionError: division by zero"}
    assert ho.WORKER_ENV == bench.WORKER_ENV


def test_host_overhead_runs_normal_mode_on_two_ranks_sharing_one_gpu(monkeypatch, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    ho = _load_script("host_overhead", ["--epcomm-path", str(ROOT)])
    assert ho.epcomm.__file__ == str(ROOT / "epcomm" / "__init__.py")
    calls = []

    def fake_run(fn, n, *args, timeout, env):
        calls.append((fn.__name__, n, args, env))
        if fn is ho._ll_worker:
            return [{"rank": r, "world": n, "dispatch_us": 10.0, "combine_plus_dispatch_us": 30.0, "combine_us": 20.0,
                     "min_dispatch_us": 9.0, "min_combine_plus_dispatch_us": 28.0,
                     "parts_us": {"x.data_ptr": 0.1, "ll._fast_dispatch": "unavailable: AttributeError: gone"}}
                    for r in range(n)]
        return [{"rank": r, "world": n, "dispatch_us": 300.0, "min_dispatch_us": 250.0, "cached_dispatch_us": 20.0,
                 "min_cached_dispatch_us": 18.0, "combine_us": 15.0, "min_combine_us": 14.0} for r in range(n)]
    monkeypatch.setattr(ho.spawn, "run", fake_run)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    path = tmp_path / "host.json"
    assert ho.main(["--json", str(path)]) == 0
    assert [c[:2] for c in calls] == [("_ll_worker", 1), ("_normal_worker", 2)]
    assert calls[0][3] == {"EPCOMM_CHECK_INDICES": "0"}
    assert calls[1][3] == {"EPCOMM_CHECK_INDICES": "0", "EPCOMM_SHARE_GPU": "1"}
    assert calls[1][2] == (4096, 7168, 8, 256, 50, 10)  # tokens, hidden, top-k, experts, iterations, warm-up
    got = json.loads(path.read_text())
    assert len(got["ranks"]) == 1 and got["ranks"][0]["dispatch_us"] == 10.0
    assert got["normal"] == {"world": 2, "shared_gpus": True, "iters": 50, "ranks": fake_run(ho._normal_worker, 2,
                                                                                              timeout=0, env={})}
    assert got["epcomm"] == str(ROOT / "epcomm")
    out = capsys.readouterr().out
    assert "rank 0/1: median: dispatch 10.00 us, combine 20.00 us" in out and "unavailable: AttributeError" in out
    assert "normal mode, 2 ranks sharing GPUs" in out
    assert "rank 1: dispatch (CPU-synchronised, BF16) 300.0 / 250.0 us; cached dispatch 20.0 / 18.0 us" in out
    # Two GPUs, the normal mode alone: one rank per GPU, nothing shared.
    calls.clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert ho.main(["--modes", "normal", "--iters", "7"]) == 0
    assert [c[:2] for c in calls] == [("_normal_worker", 2)] and calls[0][3] == {"EPCOMM_CHECK_INDICES": "0"}
    assert calls[0][2][4] == 7
    with pytest.raises(SystemExit, match="--modes"):
        ho.main(["--modes", "fast"])
