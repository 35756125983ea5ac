"""Errors name the real cause first: the argument before the group, the missing method of a group."""
from __future__ import annotations

import sys

import pytest


def test_buffer_arguments_are_checked_before_the_group():
    from epcomm import Buffer
    with pytest.raises(ValueError, match="num_nvl_bytes"):
        Buffer(None, -5)
    with pytest.raises(TypeError, match="low_latency_mode"):
        Buffer(None, 0, 0, low_latency_mode="no")


def test_a_group_missing_one_method_is_told_which():
    from epcomm.runtime.group import as_group

    class Almost:
        rank, size = 0, 1

        def allgather_bytes(self, b):
            return [b]

        def barrier(self):
            pass

    with pytest.raises(TypeError) as ei:
        as_group(Almost())
    msg = str(ei.value)
    assert "lacks broadcast_bytes()" in msg and "torch.distributed" not in msg
    with pytest.raises(TypeError, match="accepted:"):
        as_group(3.5)  # nothing of the protocol: the list of what is accepted


def test_cli_version_bare_command_and_unknown_options(capsys):
    from epcomm import __version__
    from epcomm.tools import cli
    with pytest.raises(SystemExit) as ei:
        cli.main(["--version"])
    assert ei.value.code == 0 and capsys.readouterr().out.strip() == f"epcomm {__version__}"
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert "name a command" in err and "required: cmd" not in err
    with pytest.raises(SystemExit) as ei:
        cli.main(["warmup", "--bogus"])
    err = capsys.readouterr().err
    assert ei.value.code == 2 and err.startswith("usage: epcomm warmup") and "unrecognized arguments: --bogus" in err
    with pytest.raises(SystemExit):
        cli.main(["bench"])
    err = capsys.readouterr().err
    assert "MODE" in err and "argument what" not in err


def test_warmup_without_the_cuda_extra_says_how_to_install_it_once(capsys, monkeypatch):
    from epcomm.errors import ToolchainError
    from epcomm.jit import toolchain
    from epcomm.tools import cli

    def no_nvrtc():
        raise ToolchainError("NVRTC is not usable (ImportError: no nvrtc); " + toolchain.INSTALL_FIX + " installs it")

    monkeypatch.setattr(toolchain, "nvrtc_version", no_nvrtc)
    monkeypatch.setattr("epcomm.tools.warmup._build_all", lambda *a: pytest.fail("compiled without NVRTC"))
    assert cli.main(["warmup", "--hidden", "2048", "--arch", "sm_90"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'epcomm[cu13]'" in err[0] and err[0].startswith("epcomm warmup: error: ")


def test_nvshmem_missing_names_the_extra_not_none(monkeypatch):
    from epcomm.errors import ToolchainError
    from epcomm.jit import toolchain
    monkeypatch.setattr(toolchain, "_pathfinder_header", lambda name: None)
    monkeypatch.delenv("EPCOMM_NVSHMEM_HOME", raising=False)
    monkeypatch.setitem(sys.modules, "nvidia.nvshmem", None)  # the wheel's package: not importable
    toolchain.nvshmem.cache_clear()
    try:
        with pytest.raises(ToolchainError) as ei:
            toolchain.nvshmem()
    finally:
        toolchain.nvshmem.cache_clear()
    msg = str(ei.value)
    assert "None" not in msg and "no nvidia-nvshmem wheel is installed" in msg and "epcomm[cu13]" in msg


def test_warmup_failures_are_one_line_each_with_the_logs_in_a_file(capsys, monkeypatch):
    from epcomm.tools import cli, warmup
    monkeypatch.setattr(warmup.toolchain, "check_for", lambda specs: None)
    monkeypatch.setattr(warmup, "_build_all", lambda specs, arch, jobs: [
        (s.label(), "FAILED", 0.1, "NVRTC failed\x00\nline two of the log\n" * 50) for s in specs[:2]]
        + [(s.label(), "cached", 0.0, "") for s in specs[2:]])
    assert cli.main(["warmup", "--hidden", "2048", "--mode", "low-latency", "--arch", "sm_90"]) == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert "\x00" not in err and "\x00" not in out
    assert sum(ln.startswith("epcomm warmup: error: ") and " failed: NVRTC failed" in ln for ln in lines) == 2
    assert len(lines) == 3 and lines[-1].startswith("epcomm warmup: error: 2 failed; their full compiler logs are in ")
    log = lines[-1].split(" are in ", 1)[1]
    assert "line two of the log" in open(log).read()


def test_warmup_progress_is_silent_off_a_terminal(capsys):
    from epcomm.tools.warmup import _Progress
    p = _Progress(3)
    p.step("a", "compiled")
    p.close()
    assert capsys.readouterr().out == ""


def test_cache_list_has_a_header_and_aligned_columns(capsys, monkeypatch, tmp_path):
    from pathlib import Path

    from epcomm.tools import cli
    entries = [(Path("/c/internode/k1"), {"label": "internode[hidden=2048,fp8=False]", "arch": "sm_90",
                                         "epcomm": "0.1.0"}, 2048),
               (Path("/c/intranode_combine/k2"), {"label": "intranode_combine[num_ranks=8,hidden=7168]",
                                                 "arch": "sm_90", "epcomm": "0.1.0"}, 4096)]
    monkeypatch.setattr("epcomm.jit.cache.list_entries", lambda: entries)
    assert cli.main(["cache", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["family", "specialization", "arch", "epcomm"]
    # every row's arch column starts where the header's does
    col = lines[0].index("arch")
    assert all(ln[col:col + 5] == "sm_90" for ln in lines[1:3])
    assert lines[-1].startswith("2 entries")


def test_every_cli_option_is_described():
    import argparse

    from epcomm.tools import cli
    _, sub = cli._parser()
    bare = [f"{name} {a.option_strings[0]}" for name, p in sub.choices.items() for a in p._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction) and not a.help]
    assert bare == []
