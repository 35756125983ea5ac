"""Tests of epcomm.interop on the host: TensorRef views, allocation in each framework, DLPack
export, and the stream helpers the engines call (tests/gpu/test_interop_gpu.py has those needing a
GPU).  Each framework that is not installed is skipped.
"""
from __future__ import annotations

import ctypes
import gc
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest

from epcomm import interop as I
from epcomm.interop import dlpack
from epcomm.runtime import streams
from interop_helpers import (ROOT, Legacy, Versioned, check_custom_layout, exit_with_live_exports, jax,
                             known_bits, live, ml_dtypes, torch)

if jax is not None:
    import jax.numpy as jnp

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")
needs_jax = pytest.mark.skipif(jax is None, reason="jax is not installed")
needs_ml_dtypes = pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes is not installed")


ALL_DTYPES = I.DTYPES
SPECIAL = ("bfloat16", "float8_e4m3fn", "float8_e5m2")


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
def _assert_import_leaves_out(modules: str, absent: tuple) -> None:
    """Importing ``modules`` in a fresh interpreter loads none of ``absent``."""
    code = (f"import sys, {modules}; "
            f"bad = [m for m in {absent!r} if m in sys.modules]; "
            "print(bad); assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_import_is_lazy():
    _assert_import_leaves_out("epcomm.interop", ("torch", "jax", "jaxlib", "cupy"))


def test_runtime_does_not_import_interop():
    _assert_import_leaves_out("epcomm.runtime.event, epcomm.runtime.streams",
                              ("epcomm.interop", "torch", "jax", "cupy"))


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


def test_framework_of_dlpack():
    assert I.framework_of(Versioned(np.zeros(2))) == "dlpack"


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
    a = known_bits(dtype, (5, 6))
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
    src = known_bits(dtype, (4, 7), seed=1)
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
        src = known_bits(dtype, (3, 5), seed=2)
        a = I.from_numpy("jax", src, "cpu")
        assert str(a.dtype) == dtype
        r = I.as_tensor(a, "x", dtype=dtype, shape=(3, None), device="cpu")
        assert r.framework == "jax" and r.dtype == dtype and r.readonly
        assert r.ptr == a.unsafe_buffer_pointer()
        assert r.shape == (3, 5) and r.strides == (5, 1)
        assert (r.device_type, r.device_id) == ("cpu", -1)
        assert _bytes_at(r.ptr, r.nbytes) == src.tobytes()
        # agrees with JAX's own DLPack export
        d = dlpack.ref_dlpack(a, "x", pass_stream=False)
        assert (d.ptr, d.shape, d.strides, d.dtype) == (r.ptr, r.shape, r.strides, r.dtype)
        assert I.to_numpy(a).tobytes() == src.tobytes()


@needs_jax
def test_jax_non_default_layout_uses_dlpack_strides():
    check_custom_layout(jax.devices("cpu")[0], "cpu")


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
@pytest.mark.parametrize("wrapper", [Legacy, Versioned])
def test_dlpack_generic_numpy(wrapper):
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    r = I.as_tensor(wrapper(a), "x", dtype="int32", device="cpu")
    assert r.framework == "dlpack"
    assert r.ptr == a.ctypes.data and r.shape == (3, 4) and r.strides == (4, 1)
    want = b"dltensor" if wrapper is Legacy else b"dltensor_versioned"
    assert _capsule_name(r.keepalive) == want  # kept, not consumed


@needs_torch
@needs_ml_dtypes
@pytest.mark.parametrize("wrapper", [Legacy, Versioned])
@pytest.mark.parametrize("dtype", ["bool", "bfloat16", "float8_e4m3fn", "float8_e5m2", "uint16",
                                   "int64", "float16"])
def test_dlpack_generic_torch_codes(wrapper, dtype):
    src = known_bits(dtype, (2, 9), seed=3)
    t = I.from_numpy("torch", src, "cpu")
    r = I.as_tensor(wrapper(t), "x", dtype=dtype, device="cpu")
    assert r.dtype == dtype and r.ptr == t.data_ptr()
    assert _bytes_at(r.ptr, r.nbytes) == src.tobytes()


@needs_torch
def test_dlpack_generic_strided_torch():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sl = base[1:, 2:].t()
    r = I.as_tensor(Versioned(sl), "x", device="cpu", contiguous=False)
    assert r.ptr == sl.data_ptr() and r.shape == (4, 3) and r.strides == (1, 6)
    assert np.array_equal(I.to_numpy(r), sl.numpy())
    with pytest.raises(ValueError, match="x: must be contiguous"):
        I.as_tensor(Versioned(sl), "x", device="cpu")


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
    what = {"numpy": "a NumPy array", "torch": "a CPU torch tensor", "jax": "a JAX array on the CPU"}[fw]
    assert str(ei.value) == f"x: expected a CUDA tensor, got {what} (host memory)"
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


def test_runtime_streams_host_frameworks():
    assert I.current_stream is streams.current_stream  # one function under both names
    assert streams.current_stream("numpy", 0) == 0
    with pytest.raises(ValueError, match="unknown framework 'tensorflow'; expected one of torch, cupy"):
        streams.current_stream("tensorflow", 0)
    for fw in ("numpy", "jax", "dlpack", "tensorflow"):
        with pytest.raises(ValueError, match="expected 'torch' or 'cupy'"):
            streams.current_device(fw)


def test_release_deferred_only_outside_a_capture(monkeypatch):
    from epcomm.runtime import event
    calls = []
    monkeypatch.setattr(event, "release_finished", lambda: calls.append(1))
    event.release_deferred(0)
    assert calls == []  # nothing deferred: nothing to release
    monkeypatch.setattr(event, "_DEFERRED", [(1, None)])
    event.release_deferred(7)
    assert calls == []  # capturing: an event query would invalidate the capture
    event.release_deferred(0)
    assert calls == [1]


class _FakeTensor:
    """Has record_stream, as a torch tensor does; ``fail`` makes it raise as the
    cudaMallocAsync backend does for memory torch's allocator does not own."""

    def __init__(self, fail=False):
        self.streams = []
        self.fail = fail

    def record_stream(self, s):
        if self.fail:
            raise RuntimeError("not the allocator's memory")
        self.streams.append(s)


@needs_torch
def test_record_on_stream_records_every_tensor_on_one_external_stream(monkeypatch):
    made = []

    def external(raw, device):
        made.append((raw, device))
        return ("ext", raw, device)

    monkeypatch.setattr(torch.cuda, "ExternalStream", external)
    a, b, bad = _FakeTensor(), _FakeTensor(), _FakeTensor(fail=True)
    I.record_on_stream([a, None, np.zeros(2), bad, b], 1234, 3)
    assert made == [(1234, 3)]  # built once per call
    assert a.streams == b.streams == [("ext", 1234, 3)]
    I.record_on_stream([None, np.zeros(2)], 99, 0)
    assert made == [(1234, 3)]  # no tensor: no stream built


@needs_torch
def test_record_on_current_stream(monkeypatch):
    asked = []

    def current(device):
        asked.append(device)
        return ("cur", device)

    monkeypatch.setattr(torch.cuda, "current_stream", current)
    a, b = _FakeTensor(), _FakeTensor()
    I.record_on_current_stream((a, None, b), 2)
    assert asked == [2]
    assert a.streams == b.streams == [("cur", 2)]


def test_allocating_on_host_frameworks_is_a_usable_context():
    for fw in ("numpy", "jax", "dlpack"):
        with I.allocating_on(fw, 1234, 0):
            out, ref = I.empty("numpy", (2, 3), "float32", "cpu")
        assert out.shape == (2, 3)


def test_swap_last_two_numpy():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    v = I.swap_last_two("numpy", a)
    assert v.shape == (2, 4, 3) and np.shares_memory(v, a)
    assert np.array_equal(v, a.transpose(0, 2, 1))


@needs_torch
def test_swap_last_two_torch_cpu():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    v = I.swap_last_two("torch", t)
    assert tuple(v.shape) == (4, 3) and v.data_ptr() == t.data_ptr()
    assert torch.equal(v, t.t())


@needs_jax
def test_swap_last_two_jax_cpu():
    a = jax.device_put(np.arange(6, dtype=np.float32).reshape(1, 2, 3), jax.devices("cpu")[0])
    v = I.swap_last_two("jax", a)
    assert v.shape == (1, 3, 2)
    assert np.array_equal(np.asarray(v), np.arange(6, dtype=np.float32).reshape(1, 2, 3).transpose(0, 2, 1))


@pytest.mark.parametrize("fw", _frameworks_cpu())
def test_to_host_is_a_copy(fw):
    src = np.arange(6, dtype=np.int64).reshape(2, 3)
    a = I.from_numpy(fw, src, "cpu")
    host = I.to_host(a, fw)
    assert isinstance(host, np.ndarray) and np.array_equal(host, src)
    if fw == "jax":
        return  # immutable: the caller cannot change what the host array views
    a[0, 0] = 100  # the caller writes its array after the check read it
    assert host[0, 0] == 0 and I.to_numpy(a)[0, 0] == 100


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
        src = known_bits(dtype, (3, 4, 5), seed=4)
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
    src = known_bits("bfloat16", (6, 4), seed=seed)
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
@needs_jax
@needs_ml_dtypes
@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "float8_e5m2", "float32", "uint8"])
def test_exporter_into_jax_cpu(dtype):
    base_exports, base_owners = live()
    src = known_bits(dtype, (6, 8), seed=5)
    e, ref = I.empty("jax", (6, 8), dtype, "cpu")
    assert type(e) is I.Exporter and ref.framework == "jax" and ref.obj is e
    owner = weakref.ref(e.owner)
    assert live() == (base_exports, base_owners + 1)
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
    assert live() == (base_exports, base_owners)
    assert owner() is None


@needs_torch
@needs_ml_dtypes
@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "float8_e5m2", "int64", "bool"])
def test_exporter_into_torch_cpu(dtype):
    base = live()
    src = known_bits(dtype, (5, 3), seed=6)
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
    assert live() == base and owner() is None


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
    base_exports, base_owners = live()
    e = I.Exporter.allocate((4,), "float32", "cpu")
    owner = weakref.ref(e.owner)
    caps = [e.__dlpack__(), e.__dlpack__(max_version=(1, 1))]
    assert I.live_exports() == base_exports + 2
    del e
    gc.collect()
    assert owner() is not None
    del caps
    assert live() == (base_exports, base_owners) and owner() is None


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
    # the memory is uninitialised (may hold NaN patterns): compare the bits
    assert np.array_equal(np.from_dlpack(e).view(np.uint32), I.to_numpy(e).view(np.uint32))


def test_exit_with_live_exports_cpu():
    """Consumers still holding exported memory at interpreter exit must not crash it."""
    exit_with_live_exports("cpu")


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
    src = known_bits(dtype, (3, 3), seed=7)
    a = I.from_numpy(fw, src, "cpu")
    assert I.framework_of(a) == fw
    back = I.to_numpy(a)
    assert back.dtype == src.dtype and back.tobytes() == src.tobytes()
    src.view(np.uint8)[:] = 0  # the framework array is a copy
    assert I.to_numpy(a).tobytes() == back.tobytes()


# ---- each fails if the check it names is removed or loosened ----


def test_shape_check_counts_dimensions():
    with pytest.raises(ValueError, match="x: expected shape"):
        I.as_tensor(np.zeros((2, 3, 4), np.float32), "x", shape=(2, 3), device="cpu")
    with pytest.raises(ValueError, match="x: expected shape"):
        I.as_tensor(np.zeros((2,), np.float32), "x", shape=(2, 3), device="cpu")


def test_dlpack_read_only_flag_is_kept():
    a = np.zeros((2, 3), np.float32)
    a.flags.writeable = False
    r = I.as_tensor(Versioned(a), "x", device="cpu")
    assert r.framework == "dlpack" and r.readonly
    assert not I.as_tensor(Versioned(np.zeros(3, np.float32)), "y", device="cpu").readonly


def test_dlpack_device_other_than_cpu_or_cuda_is_refused():
    import ctypes

    class _OpenCL(Versioned):  # a numpy export relabelled as device type 4 (OpenCL)
        def __dlpack__(self, **kw):
            cap = self.a.__dlpack__(**kw)
            get = ctypes.pythonapi.PyCapsule_GetPointer
            get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
            ptr = get(cap, b"dltensor_versioned")
            dlpack.DLManagedTensorVersioned.from_address(ptr).dl_tensor.device.device_type = 4
            return cap

    with pytest.raises(ValueError, match="x: expected a CUDA or CPU tensor, got DLPack device type 4"):
        I.as_tensor(_OpenCL(np.zeros(3, np.float32)), "x", device="any")
