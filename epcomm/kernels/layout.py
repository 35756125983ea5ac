"""``get_dispatch_layout`` (``cuda_src/layout.cuh``): per-token destination ranks and the
per-rank, per-node and per-expert token counts, computed on the caller's stream."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

from .. import _cuda, interop
from ..jit import loader
from ..jit.launch import launch
from ..jit.spec import KernelDef, KernelSpec, ParamsStruct

THREADS = 256


class LayoutParams(ParamsStruct):
    _cname_ = "epcomm::LayoutParams"
    _fields_ = [("topk_idx", ctypes.c_uint64), ("num_tokens_per_rank", ctypes.c_uint64),
                ("num_tokens_per_rdma_rank", ctypes.c_uint64), ("num_tokens_per_expert", ctypes.c_uint64),
                ("is_token_in_rank", ctypes.c_uint64), ("err", ctypes.c_uint64),
                ("num_tokens", ctypes.c_int), ("num_topk", ctypes.c_int), ("num_experts", ctypes.c_int),
                ("num_ranks", ctypes.c_int), ("ranks_per_node", ctypes.c_int), ("num_nodes", ctypes.c_int)]


@dataclass(frozen=True)
class LayoutSpec(KernelSpec):
    family = "layout"
    header = "layout.cuh"
    threads: int = THREADS

    def kernels(self):
        return (KernelDef("layout", "epcomm::get_dispatch_layout_kernel", (self.threads,), LayoutParams),)


def check_layout_args(num_tokens: int, num_experts: int, num_ranks: int, num_ranks_per_node: int) -> int:
    """Validate the integer arguments; returns the number of nodes (0 within one node)."""
    for name, v in (("num_experts", num_experts), ("num_ranks", num_ranks),
                    ("num_ranks_per_node", num_ranks_per_node)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if num_experts % num_ranks:
        raise ValueError(f"num_experts={num_experts} must be a multiple of num_ranks={num_ranks}")
    if num_ranks > num_ranks_per_node:
        if num_ranks % num_ranks_per_node:
            raise ValueError(f"num_ranks={num_ranks} spans nodes but is not a multiple of "
                             f"num_ranks_per_node={num_ranks_per_node}")
        return num_ranks // num_ranks_per_node
    return 0


def launch_layout(stream: int, device_id: int, topk: interop.TensorRef, num_experts: int, num_ranks: int,
                  num_nodes: int, ranks_per_node: int, out_rank: interop.TensorRef,
                  out_rdma: interop.TensorRef | None, out_expert: interop.TensorRef,
                  out_in_rank: interop.TensorRef, err_dev_ptr: int) -> None:
    """Zero the counters and launch the layout kernel on ``stream`` (outputs preallocated)."""
    N, K = topk.shape
    _cuda.memset_d32_async(out_rank.ptr, 0, num_ranks, stream)
    _cuda.memset_d32_async(out_expert.ptr, 0, num_experts, stream)
    if out_rdma is not None:
        _cuda.memset_d32_async(out_rdma.ptr, 0, num_nodes, stream)
    if N == 0:
        return
    mod = loader.load(LayoutSpec(), device_id)
    p = LayoutParams(topk.ptr, out_rank.ptr, out_rdma.ptr if out_rdma is not None else 0, out_expert.ptr,
                     out_in_rank.ptr, err_dev_ptr, N, K, num_experts, num_ranks, ranks_per_node, num_nodes)
    grid = min((N + THREADS - 1) // THREADS, 4 * _cuda.num_sms(device_id))
    smem = 4 * (num_experts + num_ranks + num_nodes)
    launch(mod.fn("layout"), grid, THREADS, stream, p, smem=smem)
