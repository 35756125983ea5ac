"""``epcomm warmup``: compile kernel specializations into the JIT cache, in parallel processes
(no GPU needed: the target is --arch, else the GPU's, else sm_90)."""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time

from epcomm import envs
from epcomm.jit import cache, compiler, toolchain
from epcomm.kernels import catalogue
from epcomm.kernels.smoke import SmokeNvshmemSpec, SmokePeerStoreSpec
from epcomm.kernels.timing import SpinWaitSpec
from epcomm.tools import messages


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
            messages.warning("warmup", f"skipping {label}: {why}")
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
        messages.warning("warmup", "EPCOMM_DISABLE_CACHE is set, so nothing is kept: the kernels are "
                         "compiled to check them, and compiled again at first use")
    else:
        why = cache.unwritable_reason()
        if why is not None:
            # Compiling for minutes to keep nothing (e.g. in an image build) is worse than failing.
            raise ValueError(f"the JIT cache {cache.cache_root()} cannot be written ({why}): warmup would "
                             "keep nothing; set EPCOMM_CACHE_DIR to a writable directory")


class _Progress:
    """One status line, rewritten in place on a terminal (with the seconds elapsed, so a long
    compile shows it is alive); nothing on a pipe or file, where only the final table is wanted."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.last = total, 0, ""
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        if self.live:
            threading.Thread(target=self._tick, daemon=True).start()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            self._draw()

    def _draw(self) -> None:
        with self._lock:
            line = f"[{self.done}/{self.total}] {time.perf_counter() - self.t0:5.1f}s  {self.last}"
            self.stream.write("\r" + line[:120].ljust(120))
            self.stream.flush()

    def step(self, label: str, result: str) -> None:
        self.done += 1
        self.last = f"{result} {label}"
        if self.live:
            self._draw()

    def close(self) -> None:
        self._stop.set()
        if self.live:
            with self._lock:
                self.stream.write("\r" + " " * 120 + "\r")
                self.stream.flush()


def _build_all(specs: list, arch: str, jobs: int) -> list:
    """(label, result, seconds, error) of each specialization (progress on a terminal)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("EPCOMM_")}
    rows = []
    work = [(s, arch, env) for s in specs]
    progress = _Progress(len(specs))
    try:
        if jobs == 1:
            for r in map(_build_one, work):
                rows.append(r)
                progress.step(r[0], r[1])
        else:
            # spawn: a child must not inherit a CUDA context the parent may have created.
            with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
                for f in cf.as_completed([ex.submit(_build_one, w) for w in work]):
                    r = f.result()
                    rows.append(r)
                    progress.step(r[0], r[1])
    finally:
        progress.close()
    return rows


def _report_failures(failed: list) -> None:
    """One line per failed specialization; the full logs (options, numbered source) in a file."""
    with tempfile.NamedTemporaryFile("w", prefix="epcomm-warmup-", suffix=".log", delete=False) as f:
        for name, _, _, err in failed:
            f.write(f"==== {name}\n{err.replace(chr(0), '')}\n\n")
    for name, _, _, err in failed:
        first = next((ln.strip() for ln in err.replace("\x00", "").splitlines() if ln.strip()), "no message")
        messages.error("warmup", f"{name} failed: {first[:200]}")
    messages.error("warmup", f"{len(failed)} failed; their full compiler logs are in {f.name}")


def main(a) -> int:
    """``epcomm warmup``: 0 when every specialization built, 1 when one failed."""
    arch = toolchain.normalize_arch(a.arch) if a.arch else toolchain.current_arch()  # before any work
    specs = []
    for s in _specs(a):
        if toolchain.arch_number(arch) < s.min_sm:
            messages.warning("warmup", f"skipping {s.label()}: needs sm_{s.min_sm} or newer, the target is {arch}")
        else:
            specs.append(s)
    _check_cache()
    toolchain.check_for(specs)  # one line naming the fix, not one failure per kernel
    jobs = a.jobs or envs.COMPILE_JOBS.get() or os.cpu_count() or 1
    jobs = max(1, min(jobs, len(specs)))
    messages.status("warmup", f"{len(specs)} specializations for {arch}, {jobs} parallel job(s), "
                    f"cache {envs.CACHE_DIR.get()}")
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
    if failed:
        _report_failures(failed)
    return messages.FAILED if failed else messages.OK


