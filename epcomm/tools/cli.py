"""The ``epcomm`` command: ``warmup``, ``info``, ``cache``, ``selftest``, ``bench``, ``report``, ``plan``."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from epcomm._version import __version__
from epcomm.errors import ToolchainError
from epcomm.tools import messages
from epcomm.tools.bench import defaults as bench_defaults
from epcomm.tools.bench import knobs as bench_knobs


def _csv(kind):
    def parse(s: str):
        try:
            return tuple(kind(v) for v in s.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {s!r}") from None
    return parse


# Each subcommand's implementation, imported when that subcommand runs (the CLI's start-up stays
# that of argparse: `epcomm --help` imports no compiler, no NumPy, no framework).
_COMMANDS = {
    "warmup": "epcomm.tools.warmup",
    "info": "epcomm.tools.info",
    "cache": "epcomm.tools.cache_admin",
    "selftest": "epcomm.tools.selftest",
    "bench": "epcomm.tools.bench.driver",
    "plan": "epcomm.tools.plan",
    "report": "epcomm.tools.report",
}


def _run(a) -> int:
    return importlib.import_module(_COMMANDS[a.cmd]).main(a)


def _parser() -> tuple[argparse.ArgumentParser, object]:
    """The command's parser, and the subparsers action (its `choices` map each command to its parser)."""
    ap = argparse.ArgumentParser(prog="epcomm", description="Expert-parallel communication kernels",
                                 epilog=messages.EXIT_CODES)
    ap.add_argument("--version", action="version", version=f"epcomm {__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND", title="commands")
    for add in (_add_warmup, _add_small, _add_bench, _add_plan):
        add(sub)
    return ap, sub


def _add_warmup(sub) -> None:
    """``epcomm warmup``."""
    w = sub.add_parser("warmup", help="precompile kernel specializations into the JIT cache (no GPU needed: "
                       "the target is --arch, else the GPU's, else sm_90)")
    w.add_argument("--preset", type=_csv(str), default=None,
                   help="comma-separated presets: deepseek-v3, qwen3-235b, gpt-oss, tests")
    w.add_argument("--hidden", type=_csv(int), default=None, help="hidden sizes (default 7168)")
    w.add_argument("--ranks", type=_csv(int), default=None, help="rank counts of the normal mode (default 2,4,8)")
    w.add_argument("--dtype", type=_csv(str), default=None, help="bf16,fp8 or one of them (default both)")
    w.add_argument("--mode", type=_csv(str), default=None,
                   help="normal,internode,low-latency or some of them (default all)")
    w.add_argument("--variant", type=_csv(str), default=None,
                   help="also the kernels of deepep (Buffer(numerics='deepep')) and/or logfmt (use_logfmt=True), "
                        "for the shapes asked for or the presets' (default: none, except in the tests preset)")
    w.add_argument("--arch", default=None, help="e.g. sm_90 (default: EPCOMM_ARCH, else the GPU's, else sm_90)")
    w.add_argument("--smoke", action="store_true",
                   help="also the smoke-test kernels of `epcomm selftest` and the wait kernel of `epcomm bench`")
    w.add_argument("-j", "--jobs", type=int, default=0, help="parallel compile processes (default: EPCOMM_COMPILE_JOBS, else the CPU count)")
    w.set_defaults(fn=_run)


def _add_small(sub) -> None:
    """``epcomm info``, ``cache`` and ``selftest``."""
    i = sub.add_parser("info", help="versions, cache, GPUs and their NVLink peers; whether the driver, NVRTC, NVSHMEM "
                       "and the frameworks agree on the CUDA major (exit 1 when not)")
    i.set_defaults(fn=_run)

    c = sub.add_parser("cache", help="list the JIT cache's entries, or clear them")
    c.add_argument("action", nargs="?", choices=("list", "clear"), default="list")
    c.set_defaults(fn=_run)

    s = sub.add_parser("selftest", help="on this machine's GPUs (2+): peer stores, NVSHMEM puts/signals, the layout kernel")
    s.add_argument("--gpus", type=int, default=0, help="GPUs to use (default: all)")
    s.add_argument("--timeout", type=float, default=300.0,
                   help="seconds the ranks may take before the stalled ones are named (default 300)")
    s.set_defaults(fn=_run)


def _add_bench(sub) -> None:
    """``epcomm bench``."""
    b = sub.add_parser("bench", help="benchmarks: timings, same-run baselines and checks against epcomm.reference "
                       "(see epcomm/tools/bench/)", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="environment (recorded in the JSON):\n" + bench_knobs.help_text())
    b.add_argument("what", metavar="MODE", choices=("normal", "low-latency", "internode", "all"),
                   help="normal: the normal mode inside one node; low-latency; internode: the normal mode across "
                   "nodes declared on this host (--ranks-per-node); all: normal and low-latency")
    b.add_argument("--gpus", "--ranks", dest="gpus", type=int, default=0,
                   help="ranks, one per GPU (default: all GPUs); internode with EPCOMM_SHARE_GPU=1 may run more "
                   "ranks than GPUs, sharing them (results checked, timings meaningless)")
    b.add_argument("--ranks-per-node", type=int, default=None,
                   help="internode: ranks per declared node, passed to the ranks as EPCOMM_RANKS_PER_NODE (default: "
                   "EPCOMM_RANKS_PER_NODE if set, else ranks // 2); must divide the ranks, at least 2 nodes")
    b.add_argument("--tokens", type=int, default=None,
                   help=f"tokens per rank (default {bench_defaults.NORMAL_TOKENS} normal and internode, "
                   f"{bench_defaults.LL_TOKENS} low-latency)")
    b.add_argument("--hidden", type=int, default=bench_defaults.HIDDEN,
                   help=f"hidden size of the rows (default {bench_defaults.HIDDEN})")
    b.add_argument("--topk", type=int, default=bench_defaults.TOPK,
                   help=f"experts per token (default {bench_defaults.TOPK})")
    b.add_argument("--experts", type=int, default=bench_defaults.EXPERTS,
                   help=f"experts in all, a multiple of the ranks (default {bench_defaults.EXPERTS})")
    b.add_argument("--sms", type=_csv(int), default=bench_defaults.DEFAULT_SMS,
                   help="normal-mode SM counts (default " + ",".join(map(str, bench_defaults.DEFAULT_SMS)) + ")")
    b.add_argument("--iters", type=int, default=None,
                   help=f"timed iterations per operation (default {bench_defaults.ITERS}; internode with ranks "
                   f"sharing a GPU: {bench_defaults.SHARED_GPU_ITERS})")
    b.add_argument("--json", default=None,
                   help="write the results here (after each mode, so a later failure keeps the earlier numbers)")
    b.add_argument("--plot", default=None, metavar="FILE.png",
                   help="also draw the results into this image: GB/s against SMs per operation with the NCCL and "
                   "peer-copy baselines, the low-latency times (needs matplotlib: the plot extra)")
    b.add_argument("--timeout", type=float, default=bench_defaults.SPAWN_TIMEOUT_S,
                   help="seconds each mode's spawn may take before its stalled ranks are named "
                   f"(default {bench_defaults.SPAWN_TIMEOUT_S:g})")
    b.add_argument("--aligner", choices=bench_defaults.ALIGNER_MODES, default="clock",
                   help="how timed calls start together: 'clock' (GPU start barrier; falls back to 'wall' "
                   "if its first barriers do not align) or 'wall' (NCCL all-reduce, then a fixed wait)")
    b.set_defaults(fn=_run)

    r = sub.add_parser("report", help="no GPU: print the tables of a stored `epcomm bench --json` result, and "
                       "with --plot draw them")
    r.add_argument("results", metavar="RESULTS.json", help="a file written by `epcomm bench --json`")
    r.add_argument("--plot", default=None, metavar="FILE.png",
                   help="also draw the results into this image (needs matplotlib: the plot extra)")
    r.set_defaults(fn=_run)


def _add_plan(sub) -> None:
    """``epcomm plan``."""
    p = sub.add_parser("plan", help="no GPU: bytes per GPU over the network and NVLink, lower-bound times and "
                       "receive sizes of dispatch and combine across nodes (epcomm's route and a flat all-to-all)")
    p.add_argument("--nodes", type=int, required=True, help="nodes (2 or more)")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (ranks) per node")
    p.add_argument("--tokens", type=int, required=True, help="tokens per GPU")
    p.add_argument("--hidden", type=int, required=True, help="hidden size of the rows")
    p.add_argument("--topk", type=int, required=True, help="experts per token")
    p.add_argument("--experts", type=int, required=True, help="experts in all, a multiple of the GPUs")
    p.add_argument("--dtype", default="bf16", help="dispatch rows: bf16 or fp8 (combine rows are bf16)")
    p.add_argument("--routing", default="uniform", help="uniform, or node-limited (with --max-nodes)")
    p.add_argument("--max-nodes", type=int, default=None, help="node-limited routing: nodes per token at most")
    p.add_argument("--nic-gbps", type=float, default=50.0, help="network GB/s per GPU and direction (default 50)")
    p.add_argument("--nvlink-gbps", type=float, default=160.0,
                   help="NVLink GB/s per GPU and direction (default 160, H800)")
    p.add_argument("--seed", type=int, default=0, help="seed of the drawn routing")
    p.add_argument("--json", default=None, help="also write the numbers here")
    p.set_defaults(fn=_run)


def main(argv=None) -> int:
    """Run the ``epcomm`` command; its exit code (:mod:`epcomm.tools.messages`): 0 success; 1 a
    step failed (a kernel did not build, a check or a rank failed, an install is missing or
    mismatched); 2 a usage error (bad arguments, printed as one line and the subcommand's usage,
    or nothing to run them on)."""
    ap, sub = _parser()
    a, extra = ap.parse_known_args(argv)
    if a.cmd is None:
        ap.print_help(sys.stderr)
        print(file=sys.stderr)
        messages.error(None, "name a command, e.g. `epcomm info`")
        return messages.USAGE
    if extra:  # reported by the subcommand, with its own usage rather than the top level's
        sub.choices[a.cmd].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return a.fn(a)
    except (ValueError, TypeError) as e:
        messages.error(a.cmd, str(e))
        return messages.USAGE
    except ToolchainError as e:  # an install problem: one line with the fix
        messages.error(a.cmd, str(e))
        return messages.FAILED
    except BrokenPipeError:  # the output went into a reader that stopped early (`| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return messages.OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
