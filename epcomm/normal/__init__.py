"""The normal (high-throughput) mode inside one NVLink domain: peer memory state (state.py), the
layout (layout.py), dispatch (dispatch.py: its arguments' checks in dispatch_args.py, its outputs'
shapes in shapes.py) and combine (combine.py).  Kernels:
``cuda_src/intranode.cuh`` via :mod:`epcomm.kernels.intranode`."""
from __future__ import annotations

from epcomm.normal.combine import combine
from epcomm.normal.dispatch import dispatch
from epcomm.normal.handle import DispatchHandle
from epcomm.normal.layout import get_dispatch_layout
from epcomm.normal.state import NvlinkState

__all__ = ["DispatchHandle", "NvlinkState", "combine", "dispatch", "get_dispatch_layout"]
