"""Tests of epcomm.interop: TensorRef views, allocation in each framework, DLPack export.

CPU tests run everywhere (each framework that is not installed is skipped); tests marked
``gpu`` need an NVIDIA GPU and are skipped without one.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest

from epcomm import interop as I

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _opt(name):
    try:
        return importlib.import_module(name)
    except Exception:
        return None


torch = _opt("torch")
jax = _opt("jax")
ml_dtypes = _opt("ml_dtypes")
if jax is not None:
    import jax.numpy as jnp  # noqa: E402
    import jax.dlpack  # noqa: E402,F401

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")
needs_jax = pytest.mark.skipif(jax is None, reason="jax is not installed")
needs_ml_dtypes = pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes is not installed")


def _gpu_count() -> int:
    """Number of CUDA devices, 0 on any failure (no driver, no bindings, no device)."""
    try:
        from cuda.bindings import driver as drv
        err = drv.cuInit(0)[0]
        if err != drv.CUresult.CUDA_SUCCESS:
            return 0
        err, n = drv.cuDeviceGetCount()
        if err != drv.CUresult.CUDA_SUCCESS:
            return 0
        return int(n)
    except BaseException:
        return 0


_GPUS = _gpu_count()


def requires_gpu(fn):
    """Mark a test ``gpu`` and skip it when no CUDA device is present."""
    fn = pytest.mark.gpu(fn)
    return pytest.mark.skipif(_GPUS < 1, reason="needs an NVIDIA GPU")(fn)


ALL_DTYPES = I.DTYPES
SPECIAL = ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def _np_dtype(name):
    return I._np_tables()[1][name]


def _known_bits(dtype: str, shape, seed: int = 0) -> np.ndarray:
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
        return vals.astype(_np_dtype(dtype)).reshape(shape)
    return raw.view(_np_dtype(dtype)).reshape(shape)


def _bytes_at(ptr: int, nbytes: int) -> bytes:
    return ctypes.string_at(ptr, nbytes)


def _capsule_name(cap) -> bytes:
    f = ctypes.pythonapi.PyCapsule_GetName
    f.restype = ctypes.c_char_p
    f.argtypes = [ctypes.py_object]
    return f(cap)


def _x64_ctx(dtype):
    """A context enabling JAX 64-bit types for 64-bit dtypes (None if unavailable)."""
    import contextlib
    if I.ITEMSIZE[dtype] < 8:
        return contextlib.nullcontext()
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    if hasattr(jax, "experimental") and hasattr(jax.experimental, "enable_x64"):
        return jax.experimental.enable_x64()
    return None


# =============================================================================================
# Import hygiene
# =============================================================================================
def test_import_is_lazy():
    code = ("import sys, epcomm.interop as I; "
            "bad = [m for m in ('torch', 'jax', 'jaxlib', 'cupy') if m in sys.modules]; "
            "print(bad); assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dtype_tables():
    assert set(I.ITEMSIZE) == set(I.DTYPES)
    assert I.ITEMSIZE["bfloat16"] == 2 and I.ITEMSIZE["float8_e4m3fn"] == 1
    assert I.ITEMSIZE["int64"] == 8 and I.ITEMSIZE["bool"] == 1


# =============================================================================================
# framework_of
# =============================================================================================
def test_framework_of_numpy_and_unsupported():
    assert I.framework_of(np.zeros(3)) == "numpy"
    with pytest.raises(TypeError, match="got list"):
        I.framework_of([1, 2])
    with pytest.raises(TypeError, match="got int"):
        I.framework_of(3)


@needs_torch
def test_framework_of_torch():
    assert I.framework_of(torch.zeros(2)) == "torch"
    assert I.framework_of(torch.nn.Parameter(torch.zeros(2))) == "torch"


@needs_jax
def test_framework_of_jax():
    assert I.framework_of(jnp.zeros(2)) == "jax"
    assert I.framework_of(jax.device_put(np.zeros(2), jax.devices("cpu")[0])) == "jax"
    e = I.Exporter.allocate((2,), "float32", "cpu")
    assert I.framework_of(e) == "jax"


class _Legacy:
    """Wraps an array; its __dlpack__ takes no keyword (an old producer)."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self):
        return self.a.__dlpack__()

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


class _Versioned:
    """Wraps an array and forwards every __dlpack__ keyword."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, **kw):
        return self.a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


def test_framework_of_dlpack():
    assert I.framework_of(_Versioned(np.zeros(2))) == "dlpack"


# =============================================================================================
# TensorRef properties
# =============================================================================================
def test_tensorref_properties():
    r = I.TensorRef(0x1000, (3, 4), (4, 1), "bfloat16", "cpu", -1, "numpy")
    assert (r.itemsize, r.ndim, r.numel, r.nbytes) == (2, 2, 12, 24)
    assert r.is_contiguous and not r.is_col_major_2d
    c = I.TensorRef(0, (3, 4), (1, 3), "float32", "cpu", -1, "numpy")
    assert c.is_col_major_2d and not c.is_contiguous
    # size-1 dims ignore strides
    assert I.TensorRef(0, (1, 4), (999, 1), "int8", "cpu", -1, "numpy").is_contiguous
    assert I.TensorRef(0, (4, 1), (1, 77), "int8", "cpu", -1, "numpy").is_col_major_2d
    assert I.TensorRef(0, (1, 4), (5, 1), "int8", "cpu", -1, "numpy").is_col_major_2d
    assert not I.TensorRef(0, (2, 4), (8, 1), "int8", "cpu", -1, "numpy").is_contiguous
    assert I.TensorRef(0, (0, 4), (9, 9), "int8", "cpu", -1, "numpy").is_contiguous
    assert not I.TensorRef(0, (3,), (1,), "int8", "cpu", -1, "numpy").is_col_major_2d
    s = I.TensorRef(0, (), (), "float32", "cpu", -1, "numpy")
    assert s.numel == 1 and s.ndim == 0 and s.is_contiguous
    assert "bfloat16" in repr(r)


# =============================================================================================
# NumPy
# =============================================================================================
@needs_ml_dtypes
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_numpy_roundtrip_every_dtype(dtype):
    a = _known_bits(dtype, (5, 6))
    r = I.as_tensor(a, "x", dtype=dtype, device="cpu")
    assert r.framework == "numpy" and r.dtype == dtype
    assert r.ptr == a.__array_interface__["data"][0]
    assert r.shape == (5, 6) and r.strides == (6, 1)
    assert (r.device_type, r.device_id) == ("cpu", -1)
    assert _bytes_at(r.ptr, r.nbytes) == a.tobytes()
    assert r.obj is a


def test_numpy_strided_views():
    a = np.arange(60, dtype=np.float32).reshape(6, 10)
    v = a[1:, ::2]
    r = I.as_tensor(v, "x", device="cpu", contiguous=False)
    assert r.ptr == v.__array_interface__["data"][0] == a.ctypes.data + 10 * 4
    assert r.shape == (5, 5) and r.strides == (10, 2) and not r.is_contiguous
    assert np.array_equal(I.to_numpy(r), v)
    n = a[::-1]
    r = I.as_tensor(n, "x", device="cpu", contiguous=False)
    assert r.strides == (-10, 1) and r.ptr == a.ctypes.data + 50 * 4
    assert np.array_equal(I.to_numpy(r), n)
    with pytest.raises(ValueError, match=r"x: must be contiguous \(row-major\)"):
        I.as_tensor(v, "x", device="cpu")
    f = np.asfortranarray(np.zeros((3, 4), np.float32))
    assert I.as_tensor(f, "x", device="cpu", contiguous=False).is_col_major_2d


# =============================================================================================
# torch (CPU)
# =============================================================================================
@needs_torch
@needs_ml_dtypes
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_torch_cpu_roundtrip_every_dtype(dtype):
    src = _known_bits(dtype, (4, 7), seed=1)
    t = I.from_numpy("torch", src, "cpu")
    assert str(t.dtype) == "torch." + dtype
    r = I.as_tensor(t, "x", dtype=dtype, ndim=2, device="cpu")
    assert r.framework == "torch" and r.dtype == dtype and r.itemsize == I.ITEMSIZE[dtype]
    assert r.ptr == t.data_ptr()
    assert r.shape == (4, 7) and r.strides == (7, 1)
    assert (r.device_type, r.device_id) == ("cpu", -1)
    # bit patterns written through numpy/torch are read back through the raw pointer
    assert _bytes_at(r.ptr, r.nbytes) == src.tobytes()
    back = I.to_numpy(t)
    assert back.dtype == src.dtype and back.tobytes() == src.tobytes()


@needs_torch
def test_torch_transposed_and_sliced():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tt = base.t()
    r = I.as_tensor(tt, "w", device="cpu", contiguous=False)
    assert r.shape == (6, 4) and r.strides == (1, 6) and r.ptr == base.data_ptr()
    assert r.is_col_major_2d and not r.is_contiguous
    with pytest.raises(ValueError, match=r"w: must be contiguous \(row-major\); call \.contiguous\(\)"):
        I.as_tensor(tt, "w", device="cpu")
    sl = base[1:, 2:]
    r = I.as_tensor(sl, "s", device="cpu", contiguous=False)
    assert r.shape == (3, 4) and r.strides == (6, 1)
    assert r.ptr == sl.data_ptr() == base.data_ptr() + (6 + 2) * 4
    assert np.array_equal(I.to_numpy(r), sl.numpy())
    step = base[:, ::3]
    r = I.as_tensor(step, "s", device="cpu", contiguous=False)
    assert r.strides == (6, 3)
    # a row slice of a contiguous tensor stays contiguous
    assert I.as_tensor(base[1:3], "s", device="cpu").is_contiguous
    # size-1 dims with odd strides are contiguous (as torch says)
    odd = torch.as_strided(base, (1, 4), (99, 1))
    assert odd.is_contiguous()
    r = I.as_tensor(odd, "s", device="cpu")
    assert r.shape == (1, 4) and r.strides == (99, 1) and r.is_contiguous
    assert not I.as_tensor(base[:, :1].t(), "s", device="cpu", contiguous=False).is_contiguous


@needs_torch
def test_torch_unsupported_dtype():
    c = torch.zeros(3, dtype=torch.complex64)
    with pytest.raises(TypeError, match="c: unsupported dtype complex64"):
        I.as_tensor(c, "c", device="cpu")
    with pytest.raises(TypeError, match="c: expected dtype float32, got complex64"):
        I.as_tensor(c, "c", dtype="float32", device="cpu")


# =============================================================================================
# JAX (CPU)
# =============================================================================================
@needs_jax
@needs_ml_dtypes
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_jax_cpu_roundtrip_every_dtype(dtype):
    ctx = _x64_ctx(dtype)
    if ctx is None:
        pytest.skip("cannot enable 64-bit types in this jax")
    with ctx:
        src = _known_bits(dtype, (3, 5), seed=2)
        a = I.from_numpy("jax", src, "cpu")
        assert str(a.dtype) == dtype
        r = I.as_tensor(a, "x", dtype=dtype, shape=(3, None), device="cpu")
        assert r.framework == "jax" and r.dtype == dtype and r.readonly
        assert r.ptr == a.unsafe_buffer_pointer()
        assert r.shape == (3, 5) and r.strides == (5, 1)
        assert (r.device_type, r.device_id) == ("cpu", -1)
        assert _bytes_at(r.ptr, r.nbytes) == src.tobytes()
        # agrees with JAX's own DLPack export
        d = I._ref_dlpack(a, "x", pass_stream=False)
        assert (d.ptr, d.shape, d.strides, d.dtype) == (r.ptr, r.shape, r.strides, r.dtype)
        assert I.to_numpy(a).tobytes() == src.tobytes()


def _check_custom_layout(device, device_type):
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


@needs_jax
def test_jax_non_default_layout_uses_dlpack_strides():
    _check_custom_layout(jax.devices("cpu")[0], "cpu")


@needs_jax
def test_jax_tracer_rejected():
    def f(x):
        I.as_tensor(x, "x", device="cpu")
        return x

    with pytest.raises(TypeError, match="x: got a JAX tracer"):
        jax.jit(f)(jnp.zeros(3))


@needs_jax
def test_jax_deleted_array():
    a = jax.device_put(np.ones(4, np.float32), jax.devices("cpu")[0])
    a.delete()
    with pytest.raises(ValueError, match="a: this JAX array has been deleted"):
        I.as_tensor(a, "a", device="cpu")


# =============================================================================================
# Generic DLPack path
# =============================================================================================
@pytest.mark.parametrize("wrapper", [_Legacy, _Versioned])
def test_dlpack_generic_numpy(wrapper):
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    r = I.as_tensor(wrapper(a), "x", dtype="int32", device="cpu")
    assert r.framework == "dlpack"
    assert r.ptr == a.ctypes.data and r.shape == (3, 4) and r.strides == (4, 1)
    want = b"dltensor" if wrapper is _Legacy else b"dltensor_versioned"
    assert _capsule_name(r.keepalive) == want  # kept, not consumed


@needs_torch
@needs_ml_dtypes
@pytest.mark.parametrize("wrapper", [_Legacy, _Versioned])
@pytest.mark.parametrize("dtype", ["bool", "bfloat16", "float8_e4m3fn", "float8_e5m2", "uint16",
                                   "int64", "float16"])
def test_dlpack_generic_torch_codes(wrapper, dtype):
    src = _known_bits(dtype, (2, 9), seed=3)
    t = I.from_numpy("torch", src, "cpu")
    r = I.as_tensor(wrapper(t), "x", dtype=dtype, device="cpu")
    assert r.dtype == dtype and r.ptr == t.data_ptr()
    assert _bytes_at(r.ptr, r.nbytes) == src.tobytes()


@needs_torch
def test_dlpack_generic_strided_torch():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sl = base[1:, 2:].t()
    r = I.as_tensor(_Versioned(sl), "x", device="cpu", contiguous=False)
    assert r.ptr == sl.data_ptr() and r.shape == (4, 3) and r.strides == (1, 6)
    assert np.array_equal(I.to_numpy(r), sl.numpy())
    with pytest.raises(ValueError, match="x: must be contiguous"):
        I.as_tensor(_Versioned(sl), "x", device="cpu")


def test_dlpack_capsule_keeps_producer_alive():
    class Temp:
        """Exports a fresh array each time: only the capsule keeps it alive."""

        def __init__(self):
            self.ref = None

        def __dlpack__(self, **kw):
            tmp = np.arange(100, dtype=np.int64)
            self.ref = weakref.ref(tmp)
            return tmp.__dlpack__(**kw)

        def __dlpack_device__(self):
            return (1, 0)

    src = Temp()
    r = I.as_tensor(src, "x", dtype="int64", device="cpu")
    gc.collect()
    assert src.ref() is not None
    got = np.frombuffer(_bytes_at(r.ptr, r.nbytes), dtype=np.int64)
    assert np.array_equal(got, np.arange(100))
    del r
    gc.collect()
    assert src.ref() is None  # the capsule's destructor released the producer


def test_dlpack_export_failure_is_typeerror():
    class Bad:
        def __dlpack__(self, **kw):
            raise BufferError("nope")

        def __dlpack_device__(self):
            return (1, 0)

    with pytest.raises(TypeError, match="bad: cannot export Bad through DLPack: nope"):
        I.as_tensor(Bad(), "bad", device="cpu")


# =============================================================================================
# Errors
# =============================================================================================
def _frameworks_cpu():
    out = ["numpy"]
    if torch is not None:
        out.append("torch")
    if jax is not None:
        out.append("jax")
    return out


def test_error_unsupported_type():
    msg = ("x: expected a torch.Tensor, cupy.ndarray, jax.Array, numpy.ndarray or an object "
           "with __dlpack__, got list")
    with pytest.raises(TypeError) as ei:
        I.as_tensor([1, 2, 3], "x")
    assert str(ei.value) == msg


def test_error_none():
    with pytest.raises(ValueError, match="hidden: expected a tensor, got None"):
        I.as_tensor(None, "hidden")
    assert I.as_tensor(None, "hidden", allow_none=True) is None


@pytest.mark.parametrize("fw", _frameworks_cpu())
def test_error_messages(fw):
    idx = I.from_numpy(fw, np.zeros((4, 8), np.int32), "cpu")
    with pytest.raises(TypeError) as ei:
        I.as_tensor(idx, "topk_idx", dtype="int64", device="cpu")
    assert str(ei.value) == "topk_idx: expected dtype int64, got int32"
    with pytest.raises(TypeError) as ei:
        I.as_tensor(idx, "topk_idx", dtype=("int64", "uint8", "bfloat16"), device="cpu")
    assert str(ei.value) == "topk_idx: expected dtype int64, uint8 or bfloat16, got int32"
    assert I.as_tensor(idx, "topk_idx", dtype=("int64", "int32"), device="cpu").dtype == "int32"

    x = I.from_numpy(fw, np.zeros((4, 7000), np.float32), "cpu")
    with pytest.raises(ValueError) as ei:
        I.as_tensor(x, "x", shape=(None, 7168), device="cpu")
    assert str(ei.value) == "x: expected shape (N, 7168), got (4, 7000)"
    with pytest.raises(ValueError) as ei:
        I.as_tensor(x, "x", shape=(4, 7000, 1), device="cpu")
    assert str(ei.value) == "x: expected shape (4, 7000, 1), got (4, 7000)"
    with pytest.raises(ValueError, match=r"x: expected shape \(tokens, 7168\), got \(4, 7000\)"):
        I.as_tensor(x, "x", shape=("tokens", 7168), device="cpu")
    assert I.as_tensor(x, "x", shape=(None, 7000), device="cpu").shape == (4, 7000)
    with pytest.raises(ValueError) as ei:
        I.as_tensor(x, "x", ndim=3, device="cpu")
    assert str(ei.value).startswith("x: expected a 3-D tensor, got a 2-D tensor")

    with pytest.raises(ValueError) as ei:
        I.as_tensor(x, "x")  # device='cuda' is the default
    assert str(ei.value) == "x: expected a CUDA tensor, got a CPU tensor"
    assert I.as_tensor(x, "x", device="any").device_type == "cpu"


@needs_torch
def test_error_order_dtype_before_shape():
    t = torch.zeros(3, 3, dtype=torch.int32).t()
    # several things wrong: dtype is reported first, and nothing else happened
    with pytest.raises(TypeError, match="t: expected dtype float32, got int32"):
        I.as_tensor(t, "t", dtype="float32", shape=(2, 2))
    with pytest.raises(ValueError, match="t: expected shape"):
        I.as_tensor(t, "t", dtype="int32", shape=(2, 2))
    with pytest.raises(ValueError, match="t: expected a CUDA tensor"):
        I.as_tensor(t, "t", dtype="int32", shape=(3, 3))
    with pytest.raises(ValueError, match=r"t: must be contiguous \(row-major\); call \.contiguous\(\)"):
        I.as_tensor(t, "t", dtype="int32", shape=(3, 3), device="cpu")


@needs_torch
def test_error_non_strided_torch():
    s = torch.zeros(3, 3).to_sparse()
    with pytest.raises((TypeError, ValueError), match="^s: "):
        I.as_tensor(s, "s", device="cpu")
    m = torch.zeros(3, device="meta")
    with pytest.raises(ValueError, match="m: expected a CUDA or CPU tensor, got a meta tensor"):
        I.as_tensor(m, "m", device="any")


# =============================================================================================
# Streams
# =============================================================================================
def test_current_stream_host_frameworks():
    for fw in ("jax", "numpy", "dlpack"):
        assert I.current_stream(fw, 0) == 0
    with pytest.raises(ValueError, match="unknown framework"):
        I.current_stream("tensorflow", 0)


# =============================================================================================
# empty / zeros / finish (CPU)
# =============================================================================================
def _write(ref, src: np.ndarray) -> None:
    assert ref.nbytes == src.nbytes
    ctypes.memmove(ref.ptr, src.ctypes.data, src.nbytes)


@needs_ml_dtypes
@pytest.mark.parametrize("fw", _frameworks_cpu())
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float8_e4m3fn", "int64", "bool"])
def test_empty_write_finish_cpu(fw, dtype):
    ctx = _x64_ctx(dtype) if fw == "jax" else None
    if fw == "jax" and ctx is None:
        pytest.skip("cannot enable 64-bit types in this jax")
    import contextlib
    with ctx or contextlib.nullcontext():
        src = _known_bits(dtype, (3, 4, 5), seed=4)
        out, ref = I.empty(fw, (3, 4, 5), dtype, "cpu")
        assert ref.shape == (3, 4, 5) and ref.strides == (20, 5, 1) and ref.dtype == dtype
        assert ref.device_type == "cpu" and ref.is_contiguous
        assert ref.ptr % 16 == 0
        _write(ref, src)
        res = I.finish(fw, out)
        assert I.framework_of(res) == fw
        if fw == "jax":
            assert res.unsafe_buffer_pointer() == ref.ptr  # zero-copy
        back = I.to_numpy(res)
        assert back.shape == (3, 4, 5) and back.tobytes() == src.tobytes()


@pytest.mark.parametrize("fw", _frameworks_cpu())
def test_zeros_cpu(fw):
    out, ref = I.zeros(fw, (7, 3), "float32", "cpu")
    res = I.finish(fw, out)
    assert np.array_equal(I.to_numpy(res), np.zeros((7, 3), np.float32))


def _six_known_rows(fw, seed):
    """A (6, 4) bf16 allocation of ``fw`` on the CPU filled with known bits: (src, out, ref)."""
    src = _known_bits("bfloat16", (6, 4), seed=seed)
    out, ref = I.empty(fw, (6, 4), "bfloat16", "cpu")
    _write(ref, src)
    return src, out, ref


def _finished_numpy(fw, view):
    """What the caller gets for ``view`` (of framework ``fw``), as NumPy."""
    res = I.finish(fw, view)
    assert I.framework_of(res) == fw
    return I.to_numpy(res)


@needs_ml_dtypes
@pytest.mark.parametrize("fw", _frameworks_cpu())
def test_narrow_rows_is_a_row_view_of_the_allocation(fw):
    # Speculative dispatch outputs: written through the whole allocation's pointer, returned
    # as a view of the first rows.
    src, out, ref = _six_known_rows(fw, 9)
    view, vref = I.narrow_rows((out, ref), 4)
    assert vref.shape == (4, 4) and vref.strides == ref.strides and vref.ptr == ref.ptr
    assert vref.dtype == "bfloat16" and vref.framework == ref.framework
    back = _finished_numpy(fw, view)
    assert back.shape == (4, 4) and back.tobytes() == src[:4].tobytes()
    assert I.narrow_rows((out, ref), 6) == (out, ref)
    empty_view, eref = I.narrow_rows((out, ref), 0)
    assert eref.shape == (0, 4)
    with pytest.raises(ValueError, match="7 rows of an allocation of 6"):
        I.narrow_rows((out, ref), 7)
    with pytest.raises(ValueError):
        I.narrow_rows((out, ref), -1)


@needs_ml_dtypes
@pytest.mark.parametrize("fw", _frameworks_cpu())
def test_narrow_obj_matches_narrow_rows(fw):
    # The dispatch's hit path cuts four outputs with narrow_obj (no TensorRef): same rows,
    # same memory, same framework as narrow_rows' view.
    src, out, ref = _six_known_rows(fw, 11)
    view = I.narrow_obj(out, 3)
    assert I.as_tensor(view, "view", device="cpu").ptr == ref.ptr
    back = _finished_numpy(fw, view)
    assert back.shape == (3, 4) and back.tobytes() == src[:3].tobytes()
    assert I.narrow_obj(out, 6) is out
    assert I.to_numpy(I.finish(fw, I.narrow_obj(out, 0))).shape == (0, 4)


def test_alloc_errors():
    with pytest.raises(ValueError):
        I.empty("numpy", (2,), "float32", "cuda")
    with pytest.raises(TypeError, match="unsupported dtype"):
        I.empty("numpy", (2,), "complex64", "cpu")
    with pytest.raises(ValueError, match="unknown framework"):
        I.empty("mxnet", (2,), "float32", "cpu")
    with pytest.raises(ValueError):
        I.empty("numpy", (2, -1), "float32", "cpu")


def test_finish_passthrough():
    a = np.zeros(3)
    assert I.finish("numpy", a) is a
    assert I.finish("torch", a) is a


# =============================================================================================
# Exporter
# =============================================================================================
def _live():
    gc.collect()
    return I.live_exports(), I._Allocation.live_count()


@needs_jax
@needs_ml_dtypes
@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "float8_e5m2", "float32", "uint8"])
def test_exporter_into_jax_cpu(dtype):
    base_exports, base_owners = _live()
    src = _known_bits(dtype, (6, 8), seed=5)
    e, ref = I.empty("jax", (6, 8), dtype, "cpu")
    assert type(e) is I.Exporter and ref.framework == "jax" and ref.obj is e
    owner = weakref.ref(e.owner)
    assert _live() == (base_exports, base_owners + 1)
    _write(ref, src)
    j = I.finish("jax", e)
    assert str(j.dtype) == dtype and j.shape == (6, 8)
    assert j.unsafe_buffer_pointer() == ref.ptr  # zero-copy
    assert np.asarray(j).tobytes() == src.tobytes()
    assert I.live_exports() == base_exports + 1
    del e, ref
    gc.collect()
    assert owner() is not None  # JAX's array keeps the memory alive
    assert np.asarray(j).tobytes() == src.tobytes()
    del j
    assert _live() == (base_exports, base_owners)
    assert owner() is None


@needs_torch
@needs_ml_dtypes
@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "float8_e5m2", "int64", "bool"])
def test_exporter_into_torch_cpu(dtype):
    base = _live()
    src = _known_bits(dtype, (5, 3), seed=6)
    e, ref = I.empty("jax", (5, 3), dtype, "cpu")
    owner = weakref.ref(e.owner)
    _write(ref, src)
    t = torch.from_dlpack(e)
    assert str(t.dtype) == "torch." + dtype and tuple(t.shape) == (5, 3)
    assert t.data_ptr() == ref.ptr  # zero-copy
    assert I.to_numpy(t).tobytes() == src.tobytes()
    t2 = torch.from_dlpack(e)  # a second consumer of the same memory
    assert t2.data_ptr() == ref.ptr
    assert I.live_exports() == base[0] + 2
    del e, ref
    gc.collect()
    assert owner() is not None
    del t
    gc.collect()
    assert owner() is not None  # t2 still holds it
    del t2
    assert _live() == base and owner() is None


@needs_torch
def test_exporter_versioned_and_legacy_capsules():
    e = I.Exporter.allocate((2, 3), "bfloat16", "cpu")
    base = I.live_exports()
    cap = e.__dlpack__(max_version=(1, 0))
    assert _capsule_name(cap) == b"dltensor_versioned"
    t = torch.utils.dlpack.from_dlpack(cap)
    assert _capsule_name(cap) == b"used_dltensor_versioned"
    assert t.dtype == torch.bfloat16 and t.data_ptr() == e.ptr
    del cap
    assert I.live_exports() == base + 1  # consumed: torch's tensor owns it now
    del t
    assert I.live_exports() == base
    cap = e.__dlpack__()
    assert _capsule_name(cap) == b"dltensor"
    t = torch.utils.dlpack.from_dlpack(cap)
    assert t.shape == (2, 3) and t.stride() == (3, 1)
    del cap, t
    assert I.live_exports() == base


def test_exporter_unconsumed_capsule_is_released():
    base_exports, base_owners = _live()
    e = I.Exporter.allocate((4,), "float32", "cpu")
    owner = weakref.ref(e.owner)
    caps = [e.__dlpack__(), e.__dlpack__(max_version=(1, 1))]
    assert I.live_exports() == base_exports + 2
    del e
    gc.collect()
    assert owner() is not None
    del caps
    assert _live() == (base_exports, base_owners) and owner() is None


def test_exporter_protocol_arguments():
    e = I.Exporter.allocate((4,), "float32", "cpu")
    assert tuple(e.__dlpack_device__()) == (1, 0)
    with pytest.raises(BufferError):
        e.__dlpack__(dl_device=(2, 0))
    with pytest.raises(BufferError):
        e.__dlpack__(copy=True)
    assert _capsule_name(e.__dlpack__(stream=5)) == b"dltensor"  # host: stream ignored
    cap = e.__dlpack__(dl_device=(1, 0), copy=False)
    assert _capsule_name(cap) == b"dltensor"
    # the exporter itself can be read as a tensor (a pending JAX output)
    r = I.as_tensor(e, "out", dtype="float32", shape=(4,), device="cpu")
    assert r.ptr == e.ptr and r.framework == "jax"
    assert np.array_equal(np.from_dlpack(e), I.to_numpy(e))


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


def _exit_with_live_exports(device):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               XLA_PYTHON_CLIENT_PREALLOCATE="false")
    r = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, device], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-3000:])
    assert "exports" in r.stdout


def test_exit_with_live_exports_cpu():
    """Consumers still holding exported memory at interpreter exit must not crash it."""
    _exit_with_live_exports("cpu")


@needs_jax
def test_exporter_empty_and_scalar_shapes():
    e, ref = I.empty("jax", (0, 5), "float32", "cpu")
    j = I.finish("jax", e)
    assert j.shape == (0, 5)
    e, ref = I.empty("jax", (), "float32", "cpu")
    _write(ref, np.array(2.5, np.float32))
    j = I.finish("jax", e)
    assert j.shape == () and float(j) == 2.5


# =============================================================================================
# from_numpy / to_numpy
# =============================================================================================
@needs_ml_dtypes
@pytest.mark.parametrize("fw", _frameworks_cpu())
@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "int32", "bool", "uint16"])
def test_from_to_numpy_cpu(fw, dtype):
    src = _known_bits(dtype, (3, 3), seed=7)
    a = I.from_numpy(fw, src, "cpu")
    assert I.framework_of(a) == fw
    back = I.to_numpy(a)
    assert back.dtype == src.dtype and back.tobytes() == src.tobytes()
    src.view(np.uint8)[:] = 0  # the framework array is a copy
    assert I.to_numpy(a).tobytes() == back.tobytes()


# =============================================================================================
# GPU (run on a machine with an NVIDIA GPU)
# =============================================================================================
def _htod(ptr: int, src: np.ndarray) -> None:
    from epcomm.runtime import driver
    driver.memcpy_htod(ptr, src.ctypes.data, src.nbytes)


def _dtoh(ptr: int, nbytes: int) -> bytes:
    from epcomm.runtime import driver
    buf = np.empty(nbytes, np.uint8)
    driver.check(driver.drv().cuCtxSynchronize(), "cuCtxSynchronize")
    driver.memcpy_dtoh(buf.ctypes.data, ptr, nbytes)
    return buf.tobytes()


def _torch_cuda():
    if torch is None or not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    return torch


def _cupy():
    cp = _opt("cupy")
    if cp is None:
        pytest.skip("cupy is not installed")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("cupy sees no GPU")
    except Exception as e:
        pytest.skip(f"cupy cannot use the GPU: {e}")
    return cp


def _jax_gpu():
    if jax is None:
        pytest.skip("jax is not installed")
    try:
        devs = jax.devices("gpu")
    except Exception:
        devs = []
    if not devs:
        pytest.skip("jax has no GPU backend")
    return devs[0]


@requires_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "float8_e5m2", "int64", "bool",
                                   "float32"])
def test_gpu_torch_as_tensor(dtype):
    th = _torch_cuda()
    src = _known_bits(dtype, (8, 16), seed=8)
    t = I.from_numpy("torch", src, "cuda", 0)
    assert t.is_cuda
    r = I.as_tensor(t, "x", dtype=dtype, shape=(None, 16))
    assert r.ptr == t.data_ptr() and (r.device_type, r.device_id) == ("cuda", 0)
    assert r.shape == (8, 16) and r.strides == (16, 1)
    assert _dtoh(r.ptr, r.nbytes) == src.tobytes()
    assert I.to_numpy(t).tobytes() == src.tobytes()
    r2 = I.as_tensor(t.t(), "x", contiguous=False)
    assert r2.strides == (1, 16) and r2.is_col_major_2d
    with pytest.raises(ValueError, match="x: expected a CPU tensor, got a CUDA tensor"):
        I.as_tensor(t, "x", device="cpu")
    # generic DLPack path on CUDA
    rd = I.as_tensor(_Versioned(t), "x", dtype=dtype)
    assert rd.framework == "dlpack" and rd.ptr == t.data_ptr() and rd.device_id == 0
    assert th.cuda.current_device() == 0


@requires_gpu
def test_gpu_torch_streams_and_alloc():
    th = _torch_cuda()
    assert I.current_stream("torch", 0) == th.cuda.current_stream(0).cuda_stream
    s = th.cuda.Stream()
    with th.cuda.stream(s):
        assert I.current_stream("torch", 0) == s.cuda_stream
    for dtype in ("bfloat16", "float8_e4m3fn", "int32"):
        src = _known_bits(dtype, (4, 32), seed=9)
        out, ref = I.empty("torch", (4, 32), dtype, "cuda", 0)
        assert out.is_cuda and ref.ptr == out.data_ptr() and ref.dtype == dtype
        th.cuda.synchronize()
        _htod(ref.ptr, src)
        assert I.to_numpy(I.finish("torch", out)).tobytes() == src.tobytes()
    z, _ = I.zeros("torch", (5, 5), "float32", "cuda", 0)
    assert not z.any().item()


@requires_gpu
def test_gpu_cupy():
    cp = _cupy()
    a = cp.arange(64, dtype=cp.uint16).reshape(8, 8)
    r = I.as_tensor(a, "x", dtype="bfloat16")
    assert r.dtype == "bfloat16" and r.framework == "cupy"
    assert r.ptr == a.data.ptr and r.shape == (8, 8) and r.strides == (8, 1)
    assert (r.device_type, r.device_id) == ("cuda", a.device.id)
    assert I.as_tensor(a, "x", dtype=("uint16", "bfloat16")).dtype == "uint16"
    assert I.as_tensor(a, "x").dtype == "uint16"
    b = cp.zeros((4, 4), dtype=cp.uint8)
    assert I.as_tensor(b, "x", dtype="float8_e4m3fn").dtype == "float8_e4m3fn"
    assert I.as_tensor(b, "x", dtype=("bfloat16", "float8_e5m2")).dtype == "float8_e5m2"
    with pytest.raises(TypeError, match="x: expected dtype bfloat16, got int32"):
        I.as_tensor(cp.zeros(3, dtype=cp.int32), "x", dtype="bfloat16")
    with pytest.raises(TypeError, match="x: expected dtype bfloat16, got uint8"):
        I.as_tensor(b, "x", dtype="bfloat16")
    v = a[:, ::2]
    r = I.as_tensor(v, "v", contiguous=False)
    assert r.strides == (8, 2) and r.ptr == v.data.ptr
    with pytest.raises(ValueError, match=r"v: must be contiguous \(row-major\)"):
        I.as_tensor(v, "v")
    with pytest.raises(ValueError, match="v: expected a CPU tensor"):
        I.as_tensor(a, "v", device="cpu")
    # streams
    assert I.current_stream("cupy", 0) == cp.cuda.get_current_stream().ptr
    with cp.cuda.Stream() as s:
        assert I.current_stream("cupy", 0) == s.ptr
    # allocation with stand-in dtypes, and the bits come back
    for dtype, standin in (("bfloat16", cp.uint16), ("float8_e4m3fn", cp.uint8),
                           ("float32", cp.float32)):
        src = _known_bits(dtype, (3, 16), seed=10)
        out, ref = I.empty("cupy", (3, 16), dtype, "cuda", 0)
        assert out.dtype == standin and ref.dtype == dtype and ref.ptr == out.data.ptr
        cp.cuda.Device(0).synchronize()
        _htod(ref.ptr, src)
        back = I.to_numpy(I.finish("cupy", out))
        assert back.tobytes() == src.tobytes()
        f = I.from_numpy("cupy", src, "cuda", 0)
        assert f.dtype == standin and I.to_numpy(f).tobytes() == src.tobytes()
    z, zr = I.zeros("cupy", (6,), "bfloat16", "cuda", 0)
    assert z.dtype == cp.uint16 and int(z.sum()) == 0 and zr.dtype == "bfloat16"


@requires_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "float32", "int32"])
def test_gpu_jax_as_tensor(dtype):
    dev = _jax_gpu()
    src = _known_bits(dtype, (4, 24), seed=11)
    a = I.from_numpy("jax", src, "cuda", dev.local_hardware_id)
    r = I.as_tensor(a, "x", dtype=dtype, shape=(4, 24))
    assert r.ptr == a.unsafe_buffer_pointer()
    assert (r.device_type, r.device_id) == ("cuda", dev.local_hardware_id)
    d = I._ref_dlpack(a, "x", pass_stream=False)
    assert (d.ptr, d.shape, d.strides, d.dtype, d.device_type) == \
        (r.ptr, r.shape, r.strides, r.dtype, "cuda")
    assert _dtoh(r.ptr, r.nbytes) == src.tobytes()
    with pytest.raises(ValueError, match="x: expected a CPU tensor"):
        I.as_tensor(a, "x", device="cpu")
    assert I.current_stream("jax", 0) == 0


@requires_gpu
def test_gpu_jax_non_default_layout():
    _check_custom_layout(_jax_gpu(), "cuda")


@requires_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "float8_e5m2", "float32"])
def test_gpu_exporter_into_jax(dtype):
    dev = _jax_gpu()
    did = dev.local_hardware_id
    base_exports, base_owners = _live()
    src = _known_bits(dtype, (16, 64), seed=12)
    e, ref = I.empty("jax", (16, 64), dtype, "cuda", did)
    owner = weakref.ref(e.owner)
    assert ref.device_type == "cuda" and ref.ptr % 256 == 0
    _htod(ref.ptr, src)
    j = I.finish("jax", e)
    assert str(j.dtype) == dtype and j.shape == (16, 64)
    assert j.unsafe_buffer_pointer() == ref.ptr  # zero-copy
    assert list(j.devices())[0] == dev
    assert np.asarray(j).tobytes() == src.tobytes()
    del e, ref
    gc.collect()
    assert owner() is not None
    j.block_until_ready()
    del j
    gc.collect()
    import time
    for _ in range(100):  # JAX may free device buffers asynchronously
        if owner() is None:
            break
        time.sleep(0.01)
        gc.collect()
    assert owner() is None
    assert _live() == (base_exports, base_owners)
    z, zr = I.zeros("jax", (33,), "float32", "cuda", did)
    assert np.array_equal(np.asarray(I.finish("jax", z)), np.zeros(33, np.float32))


@requires_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
def test_gpu_exporter_into_torch_with_streams(dtype):
    th = _torch_cuda()
    from epcomm.runtime import driver
    base = _live()
    src = _known_bits(dtype, (64, 128), seed=13)
    e = I.Exporter.allocate((64, 128), dtype, "cuda", 0)
    owner = weakref.ref(e.owner)
    producer = driver.stream_create()
    try:
        # the producer writes on its own stream; torch's consumer stream must wait for it
        host = th.from_numpy(src.view(np.uint8).copy()).pin_memory()
        driver.check(driver.drv().cuMemcpyHtoDAsync(driver.drv().CUdeviceptr(e.ptr),
                                                  host.data_ptr(), src.nbytes,
                                                  driver.drv().CUstream(producer)),
                    "cuMemcpyHtoDAsync")
        e.stream = producer
        consumer = th.cuda.Stream()
        with th.cuda.stream(consumer):
            t = th.from_dlpack(e)
            raw = t.view(th.uint8).clone()
        consumer.synchronize()
        assert t.data_ptr() == e.ptr and str(t.dtype) == "torch." + dtype
        assert raw.cpu().numpy().tobytes() == src.tobytes()
        t2 = th.from_dlpack(e)  # default stream consumer (DLPack stream 1)
        assert t2.data_ptr() == e.ptr
        driver.stream_sync(producer)
    finally:
        driver.stream_sync(producer)
        driver.stream_destroy(producer)
    del e
    gc.collect()
    assert owner() is not None
    del t, t2
    th.cuda.synchronize()
    assert _live() == base and owner() is None


@requires_gpu
def test_gpu_exit_with_live_exports():
    _exit_with_live_exports("cuda")


@requires_gpu
def test_gpu_dlpack_generic_cuda_and_jax_sync():
    dev = _jax_gpu()
    x = jnp.arange(1 << 20, dtype=jnp.float32)
    y = (x * 2 + 1).reshape(1024, 1024)  # possibly still running
    r = I.as_tensor(y, "y", dtype="float32", shape=(1024, 1024))  # waits (sync_jax)
    assert y.is_ready()
    got = np.frombuffer(_dtoh(r.ptr, 16), np.float32)
    assert np.array_equal(got, np.array([1, 3, 5, 7], np.float32))
    assert r.device_id == dev.local_hardware_id


@pytest.mark.multigpu
@pytest.mark.gpu
@pytest.mark.skipif(_GPUS < 2, reason="needs 2+ GPUs")
def test_multigpu_device_ids():
    th = _torch_cuda()
    t = th.zeros(4, device="cuda:1")
    r = I.as_tensor(t, "t")
    assert r.device_id == 1
    assert I.current_stream("torch", 1) == th.cuda.current_stream(1).cuda_stream
    out, ref = I.empty("torch", (3,), "float32", "cuda", 1)
    assert out.device.index == 1 and ref.device_id == 1
    e, ref = I.empty("jax", (3,), "float32", "cuda", 1)
    assert ref.device_id == 1 and e.__dlpack_device__() == (2, 1)


# ---- found by mutation testing: each fails if the check it names is removed or loosened ----


def test_shape_check_counts_dimensions():
    with pytest.raises(ValueError, match="x: expected shape"):
        I.as_tensor(np.zeros((2, 3, 4), np.float32), "x", shape=(2, 3), device="cpu")
    with pytest.raises(ValueError, match="x: expected shape"):
        I.as_tensor(np.zeros((2,), np.float32), "x", shape=(2, 3), device="cpu")


def test_dlpack_read_only_flag_is_kept():
    a = np.zeros((2, 3), np.float32)
    a.flags.writeable = False
    r = I.as_tensor(_Versioned(a), "x", device="cpu")
    assert r.framework == "dlpack" and r.readonly
    assert not I.as_tensor(_Versioned(np.zeros(3, np.float32)), "y", device="cpu").readonly


def test_dlpack_device_other_than_cpu_or_cuda_is_refused():
    import ctypes

    class _OpenCL(_Versioned):  # a numpy export relabelled as device type 4 (OpenCL)
        def __dlpack__(self, **kw):
            cap = self.a.__dlpack__(**kw)
            get = ctypes.pythonapi.PyCapsule_GetPointer
            get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
            ptr = get(cap, b"dltensor_versioned")
            I._DLManagedTensorVersioned.from_address(ptr).dl_tensor.device.device_type = 4
            return cap

    with pytest.raises(ValueError, match="x: expected a CUDA or CPU tensor, got DLPack device type 4"):
        I.as_tensor(_OpenCL(np.zeros(3, np.float32)), "x", device="any")
