"""The ``epcomm`` command: ``warmup``, ``info``, ``cache``, ``selftest``, ``bench``."""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import sys
import time

from epcomm.tools import bench
from epcomm.tools.bench import defaults as bench_defaults
from epcomm.tools.bench import knobs as bench_knobs


def _csv(kind):
    def parse(s: str):
        try:
            return tuple(kind(v) for v in s.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {s!r}") from None
    return parse


def _build_one(args):
    spec, arch, env = args
    os.environ.update(env)
    from epcomm.jit import compiler
    t0 = time.perf_counter()
    try:
        m = compiler.build(spec, arch)
        return spec.label(), ("cached" if m.cached else "compiled"), time.perf_counter() - t0, ""
    except Exception as e:  # reported in the table; the exit status says it failed
        return spec.label(), "FAILED", time.perf_counter() - t0, str(e)


def cmd_warmup(a) -> int:
    from epcomm import envs
    from epcomm.kernels import catalogue
    from epcomm.jit import toolchain
    if a.jobs < 0:
        raise ValueError(f"-j/--jobs {a.jobs}: expected 0 (the CPU count) or more")
    if a.preset is not None:
        given = [f"--{k}" for k in ("hidden", "ranks", "dtype", "mode") if getattr(a, k) is not None]
        if given:
            raise ValueError(f"--preset names its own shapes; {' and '.join(given)} cannot narrow it "
                             "(drop --preset to build the shapes you list)")
        if not a.preset:
            raise ValueError("--preset: empty list (known presets: " + ", ".join(catalogue.PRESETS) + ")")
        specs = []
        for name in a.preset:
            for s in catalogue.preset(name):
                if s not in specs:
                    specs.append(s)
    else:
        for flag, default in (("hidden", (7168,)), ("ranks", (2, 4, 8)), ("dtype", catalogue.DTYPES),
                              ("mode", catalogue.MODES)):
            v = getattr(a, flag)
            if v is None:
                setattr(a, flag, default)
            elif not v:
                raise ValueError(f"--{flag}: empty list")
        skipped: list = []
        specs = catalogue.specs_for(a.hidden, a.ranks, a.dtype, a.mode, skipped=skipped)
        for label, why in skipped:
            print(f"epcomm warmup: skipping {label}: {why}", file=sys.stderr)
        if len(specs) <= 1:  # the layout kernel alone: nothing asked for can be built
            raise ValueError(f"no kernel specialization fits --hidden {','.join(map(str, a.hidden))} "
                             f"--ranks {','.join(map(str, a.ranks))} --dtype {','.join(a.dtype)} "
                             f"--mode {','.join(a.mode)} (see the reasons above)")
    if a.smoke:
        from epcomm.kernels.smoke import SmokeNvshmemSpec, SmokePeerStoreSpec
        from epcomm.kernels.timing import SpinWaitSpec
        specs += [SmokePeerStoreSpec(), SmokeNvshmemSpec(), SpinWaitSpec()]
    arch = toolchain.normalize_arch(a.arch) if a.arch else toolchain.current_arch()
    envs.check_all()  # a malformed EPCOMM_* value: one error here, not one per kernel
    if envs.DISABLE_CACHE.get():
        print("epcomm warmup: EPCOMM_DISABLE_CACHE is set, so nothing is kept: the kernels are "
              "compiled to check them, and compiled again at first use", file=sys.stderr)
    else:
        from epcomm.jit import cache
        why = cache.unwritable_reason()
        if why is not None:
            # Compiling for minutes to keep nothing (e.g. in an image build) is worse than failing.
            raise ValueError(f"the JIT cache {cache.cache_root()} cannot be written ({why}): warmup would "
                             "keep nothing; set EPCOMM_CACHE_DIR to a writable directory")
    jobs = a.jobs or envs.COMPILE_JOBS.get() or os.cpu_count() or 1
    jobs = max(1, min(jobs, len(specs)))
    print(f"epcomm warmup: {len(specs)} specializations for {arch}, {jobs} parallel job(s), "
          f"cache {envs.CACHE_DIR.get()}", flush=True)
    env = {k: v for k, v in os.environ.items() if k.startswith("EPCOMM_")}
    t0 = time.perf_counter()
    rows = []
    work = [(s, arch, env) for s in specs]
    if jobs == 1:
        results = map(_build_one, work)
        for i, r in enumerate(results, 1):
            rows.append(r)
            print(f"  [{i}/{len(specs)}] {r[1]:8s} {r[2]:6.2f}s  {r[0]}", flush=True)
    else:
        # spawn: a child must not inherit a CUDA context the parent may have created.
        with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
            futs = [ex.submit(_build_one, w) for w in work]
            for i, f in enumerate(cf.as_completed(futs), 1):
                r = f.result()
                rows.append(r)
                print(f"  [{i}/{len(specs)}] {r[1]:8s} {r[2]:6.2f}s  {r[0]}", flush=True)
    order = {s.label(): i for i, s in enumerate(specs)}
    rows.sort(key=lambda r: order[r[0]])
    w = max(len(r[0]) for r in rows)
    print(f"\n{'specialization':<{w}}  {'result':8s}  seconds")
    print(f"{'-' * w}  {'-' * 8}  -------")
    for name, how, sec, _ in rows:
        print(f"{name:<{w}}  {how:8s}  {sec:7.2f}")
    n_c = sum(r[1] == "compiled" for r in rows)
    n_h = sum(r[1] == "cached" for r in rows)
    failed = [r for r in rows if r[1] == "FAILED"]
    print(f"\n{n_c} compiled, {n_h} cached, {len(failed)} failed in {time.perf_counter() - t0:.1f}s")
    for name, _, _, err in failed:
        print(f"\nFAILED {name}:\n{err}", file=sys.stderr)
    return 1 if failed else 0


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def cmd_info(a) -> int:
    from epcomm import __version__, envs
    from epcomm.jit import cache, toolchain
    print(f"epcomm            {__version__}")
    for dist in ("cuda-core", "cuda-bindings", "cupy-cuda13x", "cupy-cuda12x", "nvshmem4py-cu13",
                 "nvshmem4py-cu12", "nvidia-nvshmem-cu13", "nvidia-nvshmem-cu12", "torch", "jax", "ml_dtypes"):
        v = _version(dist)
        if v != "not installed" or dist in ("cuda-core", "cuda-bindings", "torch", "jax"):
            print(f"{dist:20s}{v}")
    try:
        print(f"{'NVRTC':18s}{toolchain.nvrtc_version()}")
    except Exception as e:
        print(f"{'NVRTC':18s}unavailable ({e})")
    print(f"{'nvJitLink':18s}{toolchain.nvjitlink_version()}")
    try:
        nv = toolchain.nvshmem()
        print(f"{'NVSHMEM (device)':18s}{nv.version} ({nv.device_lib})")
    except Exception as e:
        print(f"{'NVSHMEM (device)':18s}unavailable ({str(e).splitlines()[0]})")
    try:
        inc = toolchain.cuda_include_dirs()
        print(f"{'CUDA headers':18s}{', '.join(map(str, inc))}")
    except Exception as e:
        print(f"{'CUDA headers':18s}unavailable ({str(e).splitlines()[0]})")
    n, size = cache.cache_size_bytes()
    print(f"{'JIT cache':18s}{envs.CACHE_DIR.get()} ({n} entries, {size / 2**20:.1f} MiB)")
    print(f"{'target arch':18s}{toolchain.current_arch()}")
    from epcomm.runtime import driver
    try:
        count = driver.init()
    except Exception as e:
        print(f"GPUs              none visible ({str(e).splitlines()[0]})")
        return 0
    print(f"GPUs              {count}")
    for i in range(count):
        d = driver.drv()
        dev = driver.check(d.cuDeviceGet(i))
        name = driver.check(d.cuDeviceGetName(256, dev))
        name = (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).split("\x00")[0].strip()
        major = driver.device_attr(i, "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR")
        minor = driver.device_attr(i, "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR")
        peers = [j for j in range(count) if j != i and driver.can_access_peer(i, j)]
        links = ""
        try:
            import pynvml  # type: ignore  # nvidia-ml-py, optional: NVLink link counts
            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            n_up = 0
            for link in range(18 * 2):
                try:
                    if pynvml.nvmlDeviceGetNvLinkState(h, link):
                        n_up += 1
                except Exception:
                    break
            links = f", {n_up} NVLink links up"
        except Exception:
            pass
        print(f"  cuda:{i} {name} sm_{major}{minor}, {driver.num_sms(i)} SMs{links}; "
              f"peer access to {peers if peers else 'none'}")
    return 0


def cmd_cache(a) -> int:
    from epcomm import envs
    from epcomm.jit import cache
    root = envs.CACHE_DIR.get()
    if a.action == "clear":
        n, freed = cache.clear()
        print(f"removed {n} files ({freed / 2**20:.1f} MiB) from {root}")
        return 0
    entries = cache.list_entries()
    total = 0
    for p, meta, size in entries:
        total += size
        if meta is None:
            print(f"{p.parent.name:14s} {'(corrupt or unreadable: a miss, rebuilt on use)':60s} {size / 2**10:8.0f} KiB  {p.name}")
        else:
            print(f"{p.parent.name:14s} {str(meta.get('label', '?')):44s} {str(meta.get('arch', '?')):7s} "
                  f"epcomm {str(meta.get('epcomm', '?')):7s} {size / 2**10:8.0f} KiB  {p.name[:16]}")
    print(f"{len(entries)} entries, {total / 2**20:.1f} MiB in {root}")
    return 0


def cmd_selftest(a) -> int:
    from epcomm.tools.selftest import run_selftest
    return run_selftest(a.gpus, a.timeout)


def cmd_bench(a) -> int:
    return bench.main(a)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="epcomm", description="Expert-parallel communication kernels")
    sub = ap.add_subparsers(dest="cmd", required=True)

    w = sub.add_parser("warmup", help="precompile kernel specializations into the JIT cache (no GPU needed: "
                       "the target is --arch, else the GPU's, else sm_90)")
    w.add_argument("--preset", type=_csv(str), default=None,
                   help="comma-separated presets: deepseek-v3, qwen3-235b, gpt-oss, tests")
    w.add_argument("--hidden", type=_csv(int), default=None, help="hidden sizes (default 7168)")
    w.add_argument("--ranks", type=_csv(int), default=None, help="rank counts of the normal mode (default 2,4,8)")
    w.add_argument("--dtype", type=_csv(str), default=None, help="bf16,fp8 or one of them (default both)")
    w.add_argument("--mode", type=_csv(str), default=None,
                   help="normal,low-latency or one of them (default both)")
    w.add_argument("--arch", default=None, help="e.g. sm_90 (default: EPCOMM_ARCH, else the GPU's, else sm_90)")
    w.add_argument("--smoke", action="store_true",
                   help="also the smoke-test kernels of `epcomm selftest` and the wait kernel of `epcomm bench`")
    w.add_argument("-j", "--jobs", type=int, default=0, help="parallel compile processes (default: EPCOMM_COMPILE_JOBS, else the CPU count)")
    w.set_defaults(fn=cmd_warmup)

    i = sub.add_parser("info", help="versions, cache, GPUs and their NVLink peers")
    i.set_defaults(fn=cmd_info)

    c = sub.add_parser("cache", help="list the JIT cache's entries, or clear them")
    c.add_argument("action", nargs="?", choices=("list", "clear"), default="list")
    c.set_defaults(fn=cmd_cache)

    s = sub.add_parser("selftest", help="on this machine's GPUs (2+): peer stores, NVSHMEM puts/signals, the layout kernel")
    s.add_argument("--gpus", type=int, default=0, help="GPUs to use (default: all)")
    s.add_argument("--timeout", type=float, default=300.0)
    s.set_defaults(fn=cmd_selftest)

    b = sub.add_parser("bench", help="benchmarks: timings, same-run baselines and checks against epcomm.reference "
                       "(see epcomm/tools/bench/)", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="environment (recorded in the JSON):\n" + bench_knobs.help_text())
    b.add_argument("what", choices=("normal", "low-latency", "all"))
    b.add_argument("--gpus", type=int, default=0, help="ranks = GPUs to use (default: all)")
    b.add_argument("--tokens", type=int, default=None,
                   help=f"tokens per rank (default {bench_defaults.NORMAL_TOKENS} normal, "
                   f"{bench_defaults.LL_TOKENS} low-latency)")
    b.add_argument("--hidden", type=int, default=bench_defaults.HIDDEN)
    b.add_argument("--topk", type=int, default=bench_defaults.TOPK)
    b.add_argument("--experts", type=int, default=bench_defaults.EXPERTS)
    b.add_argument("--sms", type=_csv(int), default=bench_defaults.DEFAULT_SMS,
                   help="normal-mode SM counts (default " + ",".join(map(str, bench_defaults.DEFAULT_SMS)) + ")")
    b.add_argument("--iters", type=int, default=bench_defaults.ITERS)
    b.add_argument("--json", default=None,
                   help="write the results here (after each mode, so a later failure keeps the earlier numbers)")
    b.add_argument("--timeout", type=float, default=bench_defaults.SPAWN_TIMEOUT_S,
                   help="seconds each mode's spawn may take before its stalled ranks are named "
                   f"(default {bench_defaults.SPAWN_TIMEOUT_S:g})")
    b.add_argument("--aligner", choices=bench_defaults.ALIGNER_MODES, default="clock",
                   help="how timed calls start together: 'clock' (GPU start barrier; falls back to 'wall' "
                   "if its first barriers do not align) or 'wall' (NCCL all-reduce, then a fixed wait)")
    b.set_defaults(fn=cmd_bench)

    a = ap.parse_args(argv)
    try:
        return a.fn(a)
    except (ValueError, TypeError) as e:
        print(f"epcomm {a.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
