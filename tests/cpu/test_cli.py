"""`epcomm warmup` (cold, then warm: all hits) and `epcomm info` without a GPU."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest


def _run(args, env):
    return subprocess.run([sys.executable, "-m", "epcomm.tools.cli", *args], capture_output=True, text=True,
                          env=env, timeout=900)


def test_warmup_cold_then_warm(tmp_path):
    env = dict(os.environ, EPCOMM_CACHE_DIR=str(tmp_path / "c"))
    args = ["warmup", "--hidden", "2048", "--ranks", "2,4", "--dtype", "bf16,fp8", "--mode", "normal",
            "--arch", "sm_90", "-j", "2"]
    cold = _run(args, env)
    assert cold.returncode == 0, cold.stdout + cold.stderr
    assert "0 failed" in cold.stdout and " compiled, 0 cached" in cold.stdout
    n = int(cold.stdout.split("epcomm warmup: ")[1].split()[0])
    assert n == 1 + 2 * 3  # layout + per rank count (bf16, fp8 dispatch + combine)
    t0 = time.perf_counter()
    warm = _run(args, env)
    dt = time.perf_counter() - t0
    assert warm.returncode == 0, warm.stdout + warm.stderr
    assert f"0 compiled, {n} cached, 0 failed" in warm.stdout
    assert dt < 60
    for line in warm.stdout.splitlines():
        if line.startswith("intranode_") or line.startswith("layout["):
            assert "cached" in line


def test_warmup_rejects_bad_arguments(tmp_path):
    env = dict(os.environ, EPCOMM_CACHE_DIR=str(tmp_path / "c"))
    r = _run(["warmup", "--mode", "fast", "--arch", "sm_90"], env)
    assert r.returncode == 2 and "mode 'fast'" in r.stderr
    r = _run(["warmup", "--preset", "nope", "--arch", "sm_90"], env)
    assert r.returncode == 2 and "unknown preset" in r.stderr
    # nothing that was asked for can be built: an error naming why, not a silent layout-only run
    for args, why in ((["--mode", "normal", "--ranks", "1"], "num_ranks"), (["--mode", "normal", "--ranks", "100"], "num_ranks"),
                      (["--mode", "low-latency", "--hidden", "100"], "multiple of 128"),
                      (["--mode", "low-latency", "--hidden", "0"], "hidden=0")):
        r = _run(["warmup", *args, "--arch", "sm_90"], env)
        assert r.returncode == 2 and "no kernel specialization fits" in r.stderr and why in r.stderr, r.stderr
    r = _run(["warmup", "--preset", ",", "--arch", "sm_90"], env)
    assert r.returncode == 2 and "--preset: empty list" in r.stderr
    r = _run(["warmup", "-j", "-3", "--arch", "sm_90"], env)
    assert r.returncode == 2 and "-j/--jobs -3" in r.stderr


def test_bench_refuses_more_gpus_than_visible_before_spawning(tmp_path):
    pytest.importorskip("torch")  # without it `epcomm bench` stops first, saying it needs torch
    env = dict(os.environ, EPCOMM_CACHE_DIR=str(tmp_path / "c"), EPCOMM_VISIBLE_GPUS="0")
    r = _run(["bench", "low-latency", "--gpus", "4"], env)
    assert r.returncode == 2 and "--gpus 4: 0 GPU(s) visible" in r.stderr, r.stdout + r.stderr
    r = _run(["bench", "low-latency", "--tokens", "0"], env)
    assert r.returncode == 2 and "--tokens 0" in r.stderr, r.stdout + r.stderr


def test_info_runs_without_a_gpu(tmp_path):
    env = dict(os.environ, EPCOMM_CACHE_DIR=str(tmp_path / "c"))
    r = _run(["info"], env)
    assert r.returncode == 0, r.stderr
    for word in ("epcomm", "cuda-core", "NVRTC", "NVSHMEM", "JIT cache", "GPUs"):
        assert word in r.stdout


def test_warmup_preset_refuses_shape_flags_it_would_ignore(tmp_path):
    env = dict(os.environ, EPCOMM_CACHE_DIR=str(tmp_path / "c"))
    r = _run(["warmup", "--preset", "gpt-oss", "--ranks", "2", "--hidden", "4096", "--arch", "sm_90"], env)
    assert r.returncode == 2 and "--hidden and --ranks cannot narrow it" in r.stderr, r.stderr
    assert not (tmp_path / "c").exists()


def test_a_malformed_knob_is_one_error_before_any_compile(tmp_path):
    env = dict(os.environ, EPCOMM_CACHE_DIR=str(tmp_path / "c"), EPCOMM_DISABLE_CACHE="maybe")
    r = _run(["warmup", "--mode", "low-latency", "--dtype", "bf16", "--arch", "sm_90", "-j", "1"], env)
    assert r.returncode == 2 and r.stderr.count("EPCOMM_DISABLE_CACHE") == 1 and "FAILED" not in r.stdout, r


def test_selftest_checks_the_gpu_count_before_spawning(tmp_path):
    env = dict(os.environ, EPCOMM_CACHE_DIR=str(tmp_path / "c"), EPCOMM_VISIBLE_GPUS="1")
    for args, words in ((["--gpus", "2"], "--gpus 2: 1 GPU(s) visible"), (["--gpus", "-1"], "--gpus -1: 1 GPU(s)"),
                        ([], "needs 2 or more GPUs (or one with EPCOMM_SHARE_GPU=1); 1 visible")):
        r = _run(["selftest", *args], env)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_info_columns_do_not_run_together(tmp_path):
    env = dict(os.environ, EPCOMM_CACHE_DIR=str(tmp_path / "c"))
    r = _run(["info"], env)
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(("nvidia-", "cuda-", "cupy-", "nvshmem4py")):
            assert len(line.split()) >= 2, line


def test_warmup_fails_at_once_when_the_cache_cannot_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the cache directory should go
    env = dict(os.environ, EPCOMM_CACHE_DIR=str(blocker / "c"))
    t0 = time.perf_counter()
    r = _run(["warmup", "--mode", "low-latency", "--dtype", "bf16", "--arch", "sm_90", "-j", "1"], env)
    assert r.returncode == 2 and "cannot be written" in r.stderr and "EPCOMM_CACHE_DIR" in r.stderr, r
    assert "compiled" not in r.stdout and time.perf_counter() - t0 < 60


# Each subcommand's usage errors and failures: (argv, environment, exit code, the one error line's start).
_ERRORS = [
    ([], {}, 2, "epcomm: error: name a command, e.g. `epcomm info`"),
    (["warmup", "--bogus"], {}, 2, "epcomm warmup: error: unrecognized arguments: --bogus"),
    (["warmup", "--arch", "sm_10"], {}, 2, "epcomm warmup: error: arch 'sm_10': the kernels need sm_80 or newer"),
    (["warmup", "--dtype", "", "--arch", "sm_90"], {}, 2, "epcomm warmup: error: --dtype: empty list"),
    (["cache", "bogus"], {}, 2, "epcomm cache: error: argument action: invalid choice: 'bogus'"),
    (["selftest", "--gpus", "-1"], {"EPCOMM_VISIBLE_GPUS": "1"}, 2, "epcomm selftest: error: --gpus -1: 1 GPU(s) visible"),
    (["selftest"], {"EPCOMM_VISIBLE_GPUS": "0"}, 2, "epcomm selftest: error: needs 2 or more GPUs"),
    (["bench", "fast"], {}, 2, "epcomm bench: error: argument MODE: invalid choice: 'fast'"),
    (["bench", "low-latency", "--tokens", "0"], {"torch": "yes"}, 2, "epcomm bench: error: --tokens 0: expected >= 1"),
    (["bench", "low-latency"], {"torch": "no"}, 1, "epcomm bench: error: needs torch"),
    (["report"], {}, 2, "epcomm report: error: the following arguments are required: RESULTS.json"),
    (["report", "/nonexistent/r.json"], {}, 2, "epcomm report: error: /nonexistent/r.json: No such file"),
    (["plan", "--nodes", "2", "--gpus-per-node", "8", "--tokens", "8", "--hidden", "128", "--topk", "2",
      "--experts", "15"], {}, 2, "epcomm plan: error: num_experts=15 must be a multiple of"),
]


@pytest.mark.parametrize("argv, env, code, line", _ERRORS, ids=[" ".join(a[:2]) or "bare" for a, *_ in _ERRORS])
def test_every_command_exits_with_its_code_and_one_prefixed_error_line(argv, env, code, line, capsys, monkeypatch,
                                                                        tmp_path):
    import importlib.util

    from epcomm.tools import cli
    monkeypatch.setenv("EPCOMM_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setattr("epcomm.tools.warmup._build_all", lambda *a: pytest.fail("compiled"))
    monkeypatch.setattr("epcomm.tools.bench.driver.spawn.run", lambda *a, **k: pytest.fail("spawned"))
    for k, v in env.items():
        if k == "torch":  # whether `epcomm bench` finds torch
            real = importlib.util.find_spec
            monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, _v=v: (
                (object() if _v == "yes" else None) if name == "torch" else real(name, *a)))
        else:
            monkeypatch.setenv(k, v)
    try:
        got = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        got = e.code
    err = capsys.readouterr().err
    said = [ln for ln in err.splitlines() if ln.startswith("epcomm")]
    assert got == code and len(said) == 1 and said[0].startswith(line), err
    assert "Traceback" not in err


def test_help_lists_the_exit_codes_and_success_is_0(capsys, monkeypatch, tmp_path):
    from epcomm.tools import cli, messages
    with pytest.raises(SystemExit) as ei:
        cli.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert ei.value.code == 0 and " ".join(messages.EXIT_CODES.split()) in out
    assert (messages.OK, messages.FAILED, messages.USAGE) == (0, 1, 2)
    assert "exit codes: 0 success; 1 a step failed" in out and "2 bad arguments" in out
    monkeypatch.setenv("EPCOMM_CACHE_DIR", str(tmp_path / "c"))
    assert cli.main(["cache", "list"]) == 0 and cli.main(["cache", "clear"]) == 0
    assert capsys.readouterr().err == ""


def test_messages_have_one_home():
    """No command formats its own `epcomm <cmd>:` prefix: epcomm.tools.messages does."""
    import re
    from pathlib import Path
    tools = Path(__file__).resolve().parents[2] / "epcomm" / "tools"
    own = [f"{p.relative_to(tools)}:{i}" for p in tools.rglob("*.py") if p.name != "messages.py"
           for i, ln in enumerate(p.read_text().splitlines(), 1) if re.search(r"""print\(f?["'](\\n)?(!!! )?epcomm""", ln)]
    assert own == []
