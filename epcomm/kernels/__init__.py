"""Python descriptions of the CUDA kernels, one module per kernel family.

=====================  ============================  ========================================
module                 CUDA source (cuda_src/)       tests
=====================  ============================  ========================================
kernels.layout         layout.cuh                    tests/test_layout_gpu.py
kernels.intranode      intranode.cuh                 tests/test_intranode_gpu.py
kernels.low_latency    low_latency.cuh               tests/test_low_latency_gpu.py
kernels.smoke          smoke.cuh                     tests/test_smoke_gpu.py
kernels.timing         timing.cuh                    tests/test_timing.py, test_timing_gpu.py
=====================  ============================  ========================================

Each module defines the family's :class:`~epcomm.jit.spec.KernelSpec` subclasses (template
arguments) and the ``ParamsStruct`` mirrors of the C++ parameter structs (runtime parameters);
only ``kernels.layout`` also has the function that launches its kernel.  The other families are
launched by :mod:`epcomm.buffer` (intranode), :mod:`epcomm.low_latency` (low-latency),
:mod:`epcomm.tools.selftest` (smoke) and :mod:`epcomm.tools.bench` (timing).  Compile-only coverage of every
shipped specialization lives in ``tests/test_jit_compile.py``.
"""
