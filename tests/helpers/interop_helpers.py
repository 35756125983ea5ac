"""Shared by tests/cpu/test_interop.py and tests/gpu/test_interop_gpu.py: the optional frameworks,
host arrays with known bytes, DLPack producer wrappers, and the checks both files run on their
own devices."""
from __future__ import annotations

import gc
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

from epcomm import interop as I
from epcomm.interop import dtypes, exporter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def opt(name):
    try:
        return importlib.import_module(name)
    except Exception:
        return None


torch = opt("torch")
jax = opt("jax")
ml_dtypes = opt("ml_dtypes")
if jax is not None:
    import jax.dlpack  # noqa: F401
    import jax.numpy as jnp  # noqa: F401


def np_dtype(name):
    return dtypes.np_tables()[1][name]


def known_bits(dtype: str, shape, seed: int = 0) -> np.ndarray:
    """A host array of ``dtype`` whose bytes are a known pseudo-random pattern."""
    n = int(np.prod(shape)) if shape else 1
    isz = I.ITEMSIZE[dtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=n * isz, dtype=np.uint8)
    if dtype == "bool":
        raw &= 1
    if dtype.startswith("float"):
        # keep clear of NaN payloads, which a framework could canonicalise on copy
        vals = rng.standard_normal(n).astype(np.float32) * 4
        return vals.astype(np_dtype(dtype)).reshape(shape)
    return raw.view(np_dtype(dtype)).reshape(shape)


class Legacy:
    """Wraps an array; its __dlpack__ takes no keyword (an old producer)."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self):
        return self.a.__dlpack__()

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


class Versioned:
    """Wraps an array and forwards every __dlpack__ keyword."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, **kw):
        return self.a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


def check_custom_layout(device, device_type):
    try:
        from jax.experimental.layout import Format, Layout
    except ImportError:
        pytest.skip("no jax.experimental.layout")
    x = jax.device_put(np.arange(6.0, dtype=np.float32).reshape(2, 3), device)
    try:
        y = jax.device_put(x, Format(Layout(major_to_minor=(1, 0)), x.sharding))
        y.block_until_ready()
    except Exception as e:  # pragma: no cover - older jax / unsupported backend
        pytest.skip(f"custom layouts unavailable: {e}")
    r = I.as_tensor(y, "y", device=device_type, contiguous=False)
    assert r.framework == "jax" and r.shape == (2, 3) and r.device_type == device_type
    assert r.strides == (1, 2) and r.is_col_major_2d
    assert r.ptr == y.unsafe_buffer_pointer()
    assert np.array_equal(I.to_numpy(r), np.arange(6.0, dtype=np.float32).reshape(2, 3))
    with pytest.raises(ValueError, match="y: must be contiguous"):
        I.as_tensor(y, "y", device=device_type)


def live():
    gc.collect()
    return I.live_exports(), exporter.Allocation.live_count()


_EXIT_SCRIPT = """
import sys, epcomm.interop as I
device = sys.argv[1]
keep = []
e, r = I.empty("jax", (4, 4), "bfloat16", device)
keep.append(e.__dlpack__())  # never consumed
try:
    import torch
    keep.append(torch.from_dlpack(e))
except ImportError:
    pass
try:
    import jax
    keep.append(I.finish("jax", e))
except ImportError:
    pass
keep.append(keep)  # a cycle, collected during teardown
print("exports", I.live_exports())
"""


def exit_with_live_exports(device):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               XLA_PYTHON_CLIENT_PREALLOCATE="false")
    r = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, device], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-3000:])
    assert "exports" in r.stdout
