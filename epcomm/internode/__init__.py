"""The normal (high-throughput) mode across nodes: NVSHMEM puts between nodes, NVLink inside
(state.py: the symmetric heap and node peers; dispatch.py; combine.py; handle.py).  Kernels:
``cuda_src/internode.cuh`` via :mod:`epcomm.kernels.internode`.  Argument rules and the layout
are the NVLink engine's (:mod:`epcomm.normal`)."""
from __future__ import annotations

from epcomm.internode.combine import combine
from epcomm.internode.dispatch import dispatch
from epcomm.internode.handle import InternodeHandle
from epcomm.internode.state import InternodeState

__all__ = ["InternodeHandle", "InternodeState", "combine", "dispatch"]
