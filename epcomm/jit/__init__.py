"""Run-time compilation of the kernels in ``cuda_src/``.

One module per stage:

* :mod:`epcomm.jit.toolchain` -- where NVRTC, nvJitLink, the CUDA/CCCL/NVSHMEM headers and
  ``libnvshmem_device.a`` are, and their versions;
* :mod:`epcomm.jit.spec` -- :class:`KernelSpec` (template arguments) and :class:`ParamsStruct`
  (runtime parameters), rendered into a small instantiation source;
* :mod:`epcomm.jit.compiler` -- NVRTC (``cuda.core.Program``) to cubin, nvJitLink for NVSHMEM;
* :mod:`epcomm.jit.cache` -- the on-disk cache (atomic publish, per-key lock, corrupt = miss);
* :mod:`epcomm.jit.loader` -- the per-process, per-device memo of loaded kernels;
* :mod:`epcomm.jit.launch` -- launching a loaded kernel with a params struct.

Nothing here touches a GPU or compiles at import time.
"""
from epcomm.jit.spec import KernelSpec, ParamsStruct  # noqa: F401
