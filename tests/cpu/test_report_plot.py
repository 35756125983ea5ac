"""`epcomm report RESULTS.json [--plot F]` and `epcomm bench --plot F`: tables from a stored
result, the picture (skipped without matplotlib), and their one-line errors."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from epcomm.tools import cli

ROOT = Path(__file__).resolve().parents[2]
RESULT = ROOT / "benchmarks" / "results" / "nvidia-h200-x2-ce65d46.json"  # normal and low-latency, 2 ranks


def _fake_result() -> dict:
    """A fresh run's shape (int SM keys): 2 ranks, 2 SM counts, NCCL and peer-copy baselines."""
    ranks = [{"rank": r, "sms": {8: {"dispatch_bf16_GBps": 100.0 + r * 10, "combine_GBps": 90.0},
                                 16: {"dispatch_bf16_GBps": 200.0 + r * 10, "combine_GBps": 180.0}},
              "nccl_dispatch_bf16_GBps": 300.0, "nccl_combine_GBps": 310.0 + r * 10,
              "peer_copy": {"unidirectional_GBps": 400.0}} for r in range(2)]
    ll = [{"rank": r, "dispatch_us": 20.0 + r, "combine_us": 30.0, "nccl_dispatch_us": 40.0,
           "host_us_per_dispatch": 12.0} for r in range(2)]
    return {"meta": {"gpus": "2x Test GPU", "world_size": 2, "commit": "abc"},
            "normal": {"args": {"tokens": 64, "hidden": 256, "topk": 2, "sms": [8, 16]}, "ranks": ranks},
            "low_latency": {"args": {"tokens": 8, "hidden": 256, "topk": 2}, "ranks": ll}}


def test_report_prints_the_tables_of_a_committed_result(capsys):
    assert cli.main(["report", str(RESULT)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# epcomm bench on 2x NVIDIA H200 (world 2), commit ce65d46fd4b4")
    assert "normal mode: 4096 tokens/rank" in out and "low-latency: 128 tokens/rank" in out
    assert "  24 dispatch_bf16" in out and "check against epcomm.reference: ok" in out


@pytest.mark.parametrize("content, why", [
    (None, "No such file or directory"),
    ("{not json", "not JSON"),
    ('{"meta": {}}', "not a result of `epcomm bench --json`"),
    ("[1, 2]", "not a result of `epcomm bench --json`"),
])
def test_report_refuses_what_is_not_a_result_in_one_line(tmp_path, capsys, content, why):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    assert cli.main(["report", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"epcomm report: error: {path}: ") and why in err


def test_plot_without_matplotlib_names_the_extra_before_any_work(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    assert cli.main(["report", str(RESULT), "--plot", str(tmp_path / "p.png")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == "epcomm report: error: --plot needs matplotlib: pip install 'epcomm[plot]' (or matplotlib)\n"
    monkeypatch.setattr("epcomm.tools.bench.driver.run", lambda *a, **k: pytest.fail("benchmarked without matplotlib"))
    assert cli.main(["bench", "low-latency", "--plot", str(tmp_path / "p.png")]) == 1
    assert "pip install 'epcomm[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_report_draws_a_committed_result(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "r.png"
    assert cli.main(["report", str(RESULT), "--plot", str(png)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"epcomm report: drew normal, low_latency into {png}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    internode = ROOT / "benchmarks" / "results" / "bench-internode-h100-shared-4ranks.json"
    assert cli.main(["report", str(internode), "--plot", str(tmp_path / "i.svg")]) == 0
    assert (tmp_path / "i.svg").read_text().lstrip().startswith("<?xml")


def test_the_figure_shows_the_means_over_ranks_and_the_baselines():
    pytest.importorskip("matplotlib")
    from epcomm.tools.bench import plot
    fig, modes = plot.figure(_fake_result())
    assert modes == ["normal", "low_latency"]
    normal, ll = fig.axes
    lines = {ln.get_label(): ln for ln in normal.get_lines()}
    assert list(lines["dispatch bf16"].get_xdata()) == [8, 16]
    assert list(lines["dispatch bf16"].get_ydata()) == [105.0, 205.0]   # mean of the two ranks
    assert list(lines["combine"].get_ydata()) == [90.0, 180.0]
    assert list(lines["NCCL, dispatch bf16"].get_ydata()) == [300.0, 300.0]
    assert list(lines["NCCL, combine"].get_ydata()) == [315.0, 315.0]  # ranks 310, 320
    assert lines["NCCL, combine"].get_color() == lines["combine"].get_color()
    assert list(lines["peer copy, one rank"].get_ydata()) == [400.0, 400.0]
    assert "NCCL, dispatch fp8" not in lines  # not measured: not drawn
    labels = [t.get_text() for t in ll.get_yticklabels()]
    assert labels == ["dispatch", "combine", "nccl dispatch"] and list(ll.get_yticks()) == [2, 1, 0]  # host times: not drawn
    assert sorted(p.get_width() for p in ll.patches) == [20.5, 30.0, 40.0]
    plot.require_matplotlib().close(fig)
    with pytest.raises(ValueError, match="nothing to plot"):
        plot.figure({"meta": {}, "normal": {"args": {}, "ranks": []}})


def test_the_readme_shows_a_picture_drawn_from_a_committed_result():
    readme = (ROOT / "README.md").read_text()
    png = RESULT.with_suffix(".png")
    assert "![" in readme and f"]({png.relative_to(ROOT)})" in readme
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"epcomm report {RESULT.relative_to(ROOT)} --plot {png.relative_to(ROOT)}" in readme
    json.loads(RESULT.read_text())  # the result it is drawn from is committed beside it


def test_bench_draws_its_result_after_the_run(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "torch" else real(name, *a))
    monkeypatch.setattr("epcomm.tools.bench.driver.run", lambda *a, **k: _fake_result())
    png = tmp_path / "b.png"
    assert cli.main(["bench", "all", "--plot", str(png)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"epcomm bench: drew {png}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
