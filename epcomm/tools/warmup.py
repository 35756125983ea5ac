"""``epcomm warmup``: compile kernel specializations into the JIT cache, in parallel processes
(no GPU needed: the target is --arch, else the GPU's, else sm_90)."""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import sys
import time

from epcomm import envs
from epcomm.jit import cache, compiler, toolchain
from epcomm.kernels import catalogue
from epcomm.kernels.smoke import SmokeNvshmemSpec, SmokePeerStoreSpec
from epcomm.kernels.timing import SpinWaitSpec


def _build_one(args):
    spec, arch, env = args
    os.environ.update(env)
    t0 = time.perf_counter()
    try:
        m = compiler.build(spec, arch)
        return spec.label(), ("cached" if m.cached else "compiled"), time.perf_counter() - t0, ""
    except Exception as e:  # reported in the table; the exit status says it failed
        return spec.label(), "FAILED", time.perf_counter() - t0, str(e)


def _specs(a) -> list:
    """The specializations the arguments ask for (ValueError for a contradictory or empty ask)."""
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
            for s in catalogue.preset(name, a.variant or ()):
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
        specs = catalogue.specs_for(a.hidden, a.ranks, a.dtype, a.mode, a.variant or (), skipped=skipped)
        for label, why in skipped:
            print(f"epcomm warmup: skipping {label}: {why}", file=sys.stderr)
        if len(specs) <= 1:  # the layout kernel alone: nothing asked for can be built
            raise ValueError(f"no kernel specialization fits --hidden {','.join(map(str, a.hidden))} "
                             f"--ranks {','.join(map(str, a.ranks))} --dtype {','.join(a.dtype)} "
                             f"--mode {','.join(a.mode)} (see the reasons above)")
    if a.smoke:
        specs += [SmokePeerStoreSpec(), SmokeNvshmemSpec(), SpinWaitSpec()]
    return specs


def _check_cache() -> None:
    """A malformed EPCOMM_* value or an unwritable cache: one error before anything compiles."""
    envs.check_all()  # a malformed EPCOMM_* value: one error here, not one per kernel
    if envs.DISABLE_CACHE.get():
        print("epcomm warmup: EPCOMM_DISABLE_CACHE is set, so nothing is kept: the kernels are "
              "compiled to check them, and compiled again at first use", file=sys.stderr)
    else:
        why = cache.unwritable_reason()
        if why is not None:
            # Compiling for minutes to keep nothing (e.g. in an image build) is worse than failing.
            raise ValueError(f"the JIT cache {cache.cache_root()} cannot be written ({why}): warmup would "
                             "keep nothing; set EPCOMM_CACHE_DIR to a writable directory")


def _build_all(specs: list, arch: str, jobs: int) -> list:
    """(label, result, seconds, error) of each specialization, printed as they finish."""
    env = {k: v for k, v in os.environ.items() if k.startswith("EPCOMM_")}
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
    return rows


def main(a) -> int:
    """``epcomm warmup``: 0 when every specialization built, 1 when one failed."""
    arch = toolchain.normalize_arch(a.arch) if a.arch else toolchain.current_arch()  # before any work
    specs = []
    for s in _specs(a):
        if toolchain.arch_number(arch) < s.min_sm:
            print(f"epcomm warmup: skipping {s.label()}: needs sm_{s.min_sm} or newer, the target is {arch}",
                  file=sys.stderr)
        else:
            specs.append(s)
    _check_cache()
    toolchain.check_for(specs)  # one line naming the fix, not one failure per kernel
    jobs = a.jobs or envs.COMPILE_JOBS.get() or os.cpu_count() or 1
    jobs = max(1, min(jobs, len(specs)))
    print(f"epcomm warmup: {len(specs)} specializations for {arch}, {jobs} parallel job(s), "
          f"cache {envs.CACHE_DIR.get()}", flush=True)
    t0 = time.perf_counter()
    rows = _build_all(specs, arch, jobs)
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


