"""Tests of epcomm.interop that need an NVIDIA GPU (marked ``gpu``; skipped without one):
TensorRefs of device arrays, allocation on the device, streams, DLPack export of device memory.
"""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from epcomm import interop as I
from epcomm.interop import dlpack
from gpu_checks import needs_gpu, needs_gpus
from interop_helpers import (Versioned, check_custom_layout, exit_with_live_exports, jax, known_bits,
                             live, opt, torch)

if jax is not None:
    import jax.numpy as jnp


def requires_gpu(fn):
    """Mark a test ``gpu`` and skip it when no CUDA device is present."""
    return needs_gpu(pytest.mark.gpu(fn))


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
    cp = opt("cupy")
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
    src = known_bits(dtype, (8, 16), seed=8)
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
    rd = I.as_tensor(Versioned(t), "x", dtype=dtype)
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
        src = known_bits(dtype, (4, 32), seed=9)
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
        src = known_bits(dtype, (3, 16), seed=10)
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
    src = known_bits(dtype, (4, 24), seed=11)
    a = I.from_numpy("jax", src, "cuda", dev.local_hardware_id)
    r = I.as_tensor(a, "x", dtype=dtype, shape=(4, 24))
    assert r.ptr == a.unsafe_buffer_pointer()
    assert (r.device_type, r.device_id) == ("cuda", dev.local_hardware_id)
    d = dlpack.ref_dlpack(a, "x", pass_stream=False)
    assert (d.ptr, d.shape, d.strides, d.dtype, d.device_type) == \
        (r.ptr, r.shape, r.strides, r.dtype, "cuda")
    assert _dtoh(r.ptr, r.nbytes) == src.tobytes()
    with pytest.raises(ValueError, match="x: expected a CPU tensor"):
        I.as_tensor(a, "x", device="cpu")
    assert I.current_stream("jax", 0) == 0


@requires_gpu
def test_gpu_jax_non_default_layout():
    check_custom_layout(_jax_gpu(), "cuda")


@requires_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "float8_e5m2", "float32"])
def test_gpu_exporter_into_jax(dtype):
    dev = _jax_gpu()
    did = dev.local_hardware_id
    base_exports, base_owners = live()
    src = known_bits(dtype, (16, 64), seed=12)
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
    assert live() == (base_exports, base_owners)
    z, zr = I.zeros("jax", (33,), "float32", "cuda", did)
    assert np.array_equal(np.asarray(I.finish("jax", z)), np.zeros(33, np.float32))


@requires_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
def test_gpu_exporter_into_torch_with_streams(dtype):
    th = _torch_cuda()
    from epcomm.runtime import driver
    base = live()
    src = known_bits(dtype, (64, 128), seed=13)
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
    assert live() == base and owner() is None


@requires_gpu
def test_gpu_exit_with_live_exports():
    exit_with_live_exports("cuda")


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
@needs_gpus
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
