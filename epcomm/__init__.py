"""epcomm: expert-parallel (MoE) communication kernels for NVIDIA GPUs.

Dispatch sends each token to the GPUs holding its top-k experts; combine brings the expert
outputs back and reduces them.  Kernels are CUDA C++ compiled at first use with NVRTC (no build
step), cached on disk, and usable from PyTorch, JAX and CuPy through DLPack.

Importing this package touches no GPU and compiles nothing: the names below load lazily.
"""
from __future__ import annotations

import importlib

from epcomm._version import __version__

_LAZY = {
    "Buffer": ("epcomm.buffer", "Buffer"),
    "DispatchHandle": ("epcomm.buffer", "DispatchHandle"),
    "LowLatencyHandle": ("epcomm.low_latency", "LowLatencyHandle"),
    "EventOverlap": ("epcomm.runtime.event", "EventOverlap"),
    "Config": ("epcomm.config", "Config"),
    "get_dispatch_layout": ("epcomm.api", "get_dispatch_layout"),
    "as_group": ("epcomm.runtime.group", "as_group"),
    "EpcommError": ("epcomm.errors", "EpcommError"),
    "EpcommTimeoutError": ("epcomm.errors", "EpcommTimeoutError"),
    "CompileError": ("epcomm.errors", "CompileError"),
    "ToolchainError": ("epcomm.errors", "ToolchainError"),
    "BufferStateError": ("epcomm.errors", "BufferStateError"),
    "RankMismatchError": ("epcomm.errors", "RankMismatchError"),
    "reference": ("epcomm.reference", None),
    "interop": ("epcomm.interop", None),
    "envs": ("epcomm.envs", None),
    "torch_autograd": ("epcomm.torch_autograd", None),
    "torch_ops": ("epcomm.torch_ops", None),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    try:
        mod, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'epcomm' has no attribute {name!r}") from None
    m = importlib.import_module(mod)
    val = m if attr is None else getattr(m, attr)
    globals()[name] = val
    return val


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
