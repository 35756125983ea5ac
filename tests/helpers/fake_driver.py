"""Stand-ins for the GPU in the CPU validation tests (tests/cpu/test_validation*.py): CPU arrays
pass for arrays on cuda:0, every stream is 0, and a loaded kernel module names its kernels.
Applied with monkeypatch, so each test's changes are undone after it."""
from __future__ import annotations


class FakeModule:
    """What jit.loader.load returns here: fn(name) is the name, which launch recorders log."""

    def fn(self, name):
        return name


def cpu_arrays_as_cuda(monkeypatch) -> None:
    """interop.as_tensor takes CPU arrays as arrays on cuda:0 (also where interop.as_index_tensor
    calls it); the current stream is 0, under both of its names (interop.current_stream and
    runtime.streams.current_stream)."""
    from epcomm import interop
    from epcomm.interop import checks
    from epcomm.runtime import streams
    orig = interop.as_tensor

    def as_tensor(obj, name, **kw):
        kw.pop("device", None)
        ref = orig(obj, name, device="any", **kw)
        if ref is not None:
            ref.device_type, ref.device_id = "cuda", 0
        return ref

    monkeypatch.setattr(interop, "as_tensor", as_tensor)
    monkeypatch.setattr(checks, "as_tensor", as_tensor)
    monkeypatch.setattr(interop, "current_stream", lambda fw, d: 0)
    monkeypatch.setattr(streams, "current_stream", lambda fw, d: 0)
