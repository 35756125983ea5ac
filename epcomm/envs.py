"""Every ``EPCOMM_*`` environment variable of the library, read in one typed place.

Values are read from ``os.environ`` on every access (not at import), so a test or a
launcher may set a variable at any time before the code that uses it runs.  The README
table of variables is generated from :data:`KNOBS` (``python -m epcomm.envs`` prints it).
Tools and tests declare their own variables with :func:`knob` and the ``parse_*`` functions
here, in a registry of their own (``registry=``), so that :data:`KNOBS` holds the library's.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_bool(name: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r}: expected one of 1/0/true/false/yes/no/on/off")


def parse_float(name: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number") from None


def parse_int(name: str, raw: str) -> int:
    try:
        return int(raw, 0)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected an integer") from None


@dataclass(frozen=True)
class Knob(Generic[T]):
    name: str
    default: Callable[[], T]
    parse: Callable[[str, str], T]
    doc: str
    default_doc: str

    def get(self) -> T:
        raw = os.environ.get(self.name)
        if raw is None or raw == "" and self.parse is not parse_bool:
            return self.default()
        return self.parse(self.name, raw)

    def is_set(self) -> bool:
        return self.name in os.environ

    @contextlib.contextmanager
    def scoped(self, value: T):
        """Within the block the variable reads as ``value``, then as it was (unset included).
        For a benchmark that compares two settings of a knob inside one process (the library
        reads its knobs per call); processes started within the block inherit the value.  It
        is written as text: a bool as "1" or "0", anything else with ``str``."""
        old = os.environ.get(self.name)
        os.environ[self.name] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        try:
            yield
        finally:
            if old is None:
                os.environ.pop(self.name, None)
            else:
                os.environ[self.name] = old

    def get_memo(self) -> T:
        """:meth:`get`, parsed again only when the variable's text changed (per-call hot paths:
        the low-latency fast paths read EPCOMM_CHECK_INDICES on every call)."""
        raw = os.environ.get(self.name)
        memo = _MEMO.get(self.name)
        if memo is not None and memo[0] == raw:
            return memo[1]
        v = self.get()
        _MEMO[self.name] = (raw, v)
        return v


_MEMO: dict = {}


def parse_count(name: str, raw: str) -> int:
    """An integer >= 0."""
    v = parse_int(name, raw)
    if v < 0:
        raise ValueError(f"{name}={raw!r}: expected an integer >= 0")
    return v


def parse_str(name: str, raw: str) -> str:
    return raw


def _default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")  # listed in EXTERNAL
    # The XDG spec: a relative XDG_CACHE_HOME is invalid and ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "epcomm"


KNOBS: dict[str, Knob] = {}


def knob(name: str, default, parse, doc: str, default_doc: str | None = None, *,
         registry: dict | None = None) -> Knob:
    """A :class:`Knob` entered in ``registry`` (default :data:`KNOBS`, the library's).
    ``default``: a value or a function computing it; ``parse(name, raw)``: one of the
    ``parse_*`` functions here (or alike: ValueError naming the variable for a malformed
    value); ``default_doc``: the default as the table shows it (``repr(default)`` if
    omitted).  ValueError if ``registry`` has ``name`` already."""
    reg = KNOBS if registry is None else registry
    if name in reg:
        raise ValueError(f"{name} is declared twice")
    k = Knob(name, default if callable(default) else (lambda d=default: d), parse, doc,
             default_doc if default_doc is not None else repr(default))
    reg[name] = k
    return k


CACHE_DIR = knob("EPCOMM_CACHE_DIR", _default_cache_dir, lambda n, r: Path(r).expanduser().absolute(),
                 "Directory of the on-disk JIT cache (compiled cubins); a relative path is taken "
                 "from the current directory when read.", "~/.cache/epcomm")
DISABLE_CACHE = knob("EPCOMM_DISABLE_CACHE", False, parse_bool,
                     "Compile every kernel afresh and write nothing to the disk cache.")
ARCH = knob("EPCOMM_ARCH", "", parse_str,
            "Target architecture for JIT compiles (e.g. sm_90); default: the current GPU's, "
            "or sm_90 where no GPU is visible.", "'' (auto)")
JIT_VERBOSE = knob("EPCOMM_JIT_VERBOSE", False, parse_bool,
                   "Log every compile and cache hit to stderr.")
DUMP_DIR = knob("EPCOMM_DUMP_DIR", "", parse_str,
                "If set, write each rendered instantiation source and its compile log here.",
                "'' (off)")
NVSHMEM_HOME = knob("EPCOMM_NVSHMEM_HOME", "", parse_str,
                    "NVSHMEM installation (with include/ and lib/libnvshmem_device.a) to compile "
                    "and link against; default: the nvidia-nvshmem wheel.", "'' (wheel)")
CUDA_HOME = knob("EPCOMM_CUDA_HOME", "", parse_str,
                 "CUDA toolkit root whose include/ (and include/cccl) NVRTC should use; "
                 "default: the nvidia-cuda-runtime/-cccl wheels, then CUDA_HOME, then /usr/local/cuda.",
                 "'' (auto)")
TIMEOUT_S = knob("EPCOMM_TIMEOUT_S", 100.0, parse_float,
                 "Seconds a kernel or the host waits for a peer before raising EpcommTimeoutError "
                 "(names the rank, phase and channel that stalled).")
def parse_positive_int(name: str, raw: str) -> int:
    """An integer >= 1."""
    v = parse_int(name, raw)
    if v < 1:
        raise ValueError(f"{name}={raw!r}: expected an integer >= 1")
    return v


SHRINK_TIMEOUT_MS = knob("EPCOMM_SHRINK_TIMEOUT_MS", 10000, parse_positive_int,
                         "Buffers made with enable_shrink=True: milliseconds a kernel waits for a peer "
                         "before it masks that peer and completes without it (instead of "
                         "EPCOMM_TIMEOUT_S and EpcommTimeoutError). Longer than any stall a live rank "
                         "may have between calls. The first call of each kernel on a Buffer waits "
                         "EPCOMM_TIMEOUT_S if that is longer (a peer may still be compiling the "
                         "kernel). Read at each call.")
GROUP_TIMEOUT_S = knob("EPCOMM_GROUP_TIMEOUT_S", 600.0, parse_float,
                       "Seconds a process-group exchange (a Buffer's set-up and teardown, through "
                       "torch.distributed's store, JAX's key-value store or a shared directory) waits "
                       "for every rank before raising EpcommTimeoutError naming the missing ones; "
                       "longer than EPCOMM_TIMEOUT_S because ranks may reach the set-up minutes apart "
                       "(model loading). NVSHMEM's initialisation and heap allocation, which cannot be "
                       "bounded, report on stderr when they take longer.")
COMPILE_JOBS = knob("EPCOMM_COMPILE_JOBS", 0, parse_int,
                    "Parallel compile processes for `epcomm warmup` when -j is not given; 0 = CPU count.")
LL_FORCE_NVSHMEM_PUT = knob("EPCOMM_LL_FORCE_NVSHMEM_PUT", False, parse_bool,
                            "Low-latency kernels use NVSHMEM puts even to peers reachable over NVLink "
                            "(the RDMA code path), instead of plain stores through peer pointers.")
LL_COMBINE_PARTIALS = knob("EPCOMM_LL_COMBINE_PARTIALS", True, parse_bool,
                           "Low-latency combine: the expert side sums a token's rows it holds (2 or more of "
                           "its experts) into one fp32 partial before sending it over NVLink (on 2 ranks half "
                           "the bytes of the rows); 0 sends one bf16 row per (token, expert) as DeepEP does. "
                           "Must agree on all ranks.")
CHECK_INDICES = knob("EPCOMM_CHECK_INDICES", True, parse_bool,
                     "Check on the host, before launching, that top-k expert indices lie in [-1, E) "
                     "(one device sync per call; skipped under CUDA-graph capture; the low-latency "
                     "calls also reject repeated experts in a row). Kernels always skip an index "
                     "outside [-1, E) and record it: Buffer.check() raises it as ValueError, or the "
                     "next dispatch/combine issues a RuntimeWarning (and still runs, so no peer is "
                     "left waiting). Set 0 in production.")
GROUP_DIR = knob("EPCOMM_GROUP_DIR", "", parse_str,
                 "Shared directory for epcomm.runtime.group.init_from_env() (with RANK and WORLD_SIZE): a "
                 "framework-free bootstrap of the ranks of one host.", "'' (unset)")
VISIBLE_GPUS = knob("EPCOMM_VISIBLE_GPUS", "", parse_str,
                    "Set by epcomm.tools.spawn: the GPU count it probed, inherited by its workers.", "'' (probe)")
NUM_SMS = knob("EPCOMM_NUM_SMS", 24, parse_int,
               "Default SM budget of the normal (high-throughput) kernels; Buffer.set_num_sms overrides.")
RECV_SPECULATION = knob("EPCOMM_RECV_SPECULATION", 0.0625, parse_float,
                       "CPU-synchronised normal dispatch: allocate the outputs before the counts are "
                       "known, with this fraction of rows more than the largest receive of the last "
                       "four calls of the same shape, so the receive kernel never waits for the host "
                       "(the outputs are then row views of that allocation). A receive that does not "
                       "fit falls back to exact outputs allocated after the counts. Negative: off.")
SHARE_GPU = knob("EPCOMM_SHARE_GPU", False, parse_bool,
                 "Testing only: let ranks share one GPU (the kernels of different processes then "
                 "take turns, so it is slow and says nothing about speed). The GPU tests use it to "
                 "run 2 ranks on a one-GPU machine; in the low-latency mode NVSHMEM then runs "
                 "several PEs per GPU (its limited MPG mode, without MPS).")
RANKS_PER_NODE = knob("EPCOMM_RANKS_PER_NODE", 0, parse_count,
                      "Declare nodes of n consecutive ranks instead of discovering them (host name and "
                      "GPU peer access), so the internode path runs on one host, or on one GPU with "
                      "EPCOMM_SHARE_GPU=1 for tests. Must divide the group's size and agree on all "
                      "ranks; 0 = discover.", "0 (discover)")
def parse_peer_memory(name: str, raw: str) -> str:
    v = raw.strip().lower()
    if v not in ("ipc", "vmm"):
        raise ValueError(f"{name}={raw!r}: expected 'ipc' or 'vmm'")
    return v


PEER_MEMORY = knob("EPCOMM_PEER_MEMORY", "ipc", parse_peer_memory,
                   "How a normal-mode Buffer shares its NVLink buffer with the ranks of its node: "
                   "'ipc' (cuIpcGetMemHandle) or 'vmm' (cuMemCreate, handles passed as file "
                   "descriptors over Unix sockets: the driver keeps a dead rank's memory mapped by "
                   "the survivors until they unmap it, which IPC handles do not promise). Must "
                   "agree on all ranks.", "'ipc'")
PROFILE = knob("EPCOMM_PROFILE", False, parse_bool,
               "Kernels stamp each block's phases (globaltimer): normal mode for "
               "Buffer.profile_stamps() and benchmarks/profile_normal.py, low-latency mode for "
               "benchmarks/profile_low_latency.py; costs a few stores.")


# Variables of other tools that epcomm reads (as text, "" when unset): where CUDA lives, and
# the launcher's rank variables for epcomm.runtime.group.init_from_env.  XDG_CACHE_HOME is read by
# _default_cache_dir above.
EXTERNAL = {
    "CUDA_HOME": "a CUDA toolkit to search for headers (after EPCOMM_CUDA_HOME and the wheels)",
    "CUDA_PATH": "the same, as some installers name it",
    "RANK": "this process's rank, for epcomm.runtime.group.init_from_env (with EPCOMM_GROUP_DIR)",
    "WORLD_SIZE": "the number of processes, for epcomm.runtime.group.init_from_env",
    "XDG_CACHE_HOME": "base of the default EPCOMM_CACHE_DIR when absolute",
    # Set by epcomm (setdefault_external) before NVSHMEM starts, only when unset: a value the
    # user exported wins.
    "NVSHMEM_SYMMETRIC_SIZE": "set by epcomm when unset, to the low-latency buffer's size x 1.1 + 256 MiB "
                              "(a smaller value you export makes the buffer allocation fail)",
    "NVSHMEM_DISABLE_NVLS": "set to 1 by epcomm when unset: epcomm never needs NVLink multicast",
    "NVSHMEM_DISABLE_NCCL": "set to 1 by epcomm when unset and ranks share a GPU (EPCOMM_SHARE_GPU)",
}


def setdefault_external(name: str, value: str) -> str:
    """Set a variable of :data:`EXTERNAL` unless it is set; return its value."""
    if name not in EXTERNAL:
        raise KeyError(f"{name} is not an external variable epcomm reads (see epcomm.envs.EXTERNAL)")
    return os.environ.setdefault(name, value)


def check_all() -> None:
    """Parse every knob that is set; raise the first ValueError (a malformed value named)."""
    for k in KNOBS.values():
        if k.is_set():
            k.get()


def external(name: str) -> str:
    """The text of a variable of :data:`EXTERNAL` ("" when unset); KeyError for any other."""
    if name not in EXTERNAL:
        raise KeyError(f"{name} is not an external variable epcomm reads (see epcomm.envs.EXTERNAL)")
    return os.environ.get(name, "")


def table_markdown() -> str:
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for k in KNOBS.values():
        rows.append(f"| `{k.name}` | {k.default_doc} | {k.doc} |")
    for name, doc in EXTERNAL.items():
        rows.append(f"| `{name}` | unset | Not epcomm's own: {doc}. |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    print(table_markdown())
