"""``get_dispatch_layout`` (``cuda_src/layout.cuh``): per-token destination ranks and the
per-rank, per-node and per-expert token counts, computed on the caller's stream (the standalone
``epcomm.get_dispatch_layout``, or its ``stream=``) or on the Buffer's communication stream
(``Buffer.get_dispatch_layout`` and the layout inside ``Buffer.dispatch``)."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

from epcomm.runtime import driver
from epcomm import interop
from epcomm.validate import check_experts_divisible, check_int
from epcomm.jit import loader
from epcomm.jit.launch import launch
from epcomm.jit.spec import KernelDef, KernelSpec, ParamsStruct

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


# The kernel keeps one int counter per expert, rank and node in dynamic shared memory.  48 KiB
# is what every kernel may use without an opt-in on every GPU; the loader does opt every kernel
# in to the device's whole shared memory, but no launch above 48 KiB has run on a GPU yet, so
# larger counts raise a clear error instead of being tried (README, Limits).
LAYOUT_MAX_SMEM = 48 * 1024
LAYOUT_MAX_COUNTERS = LAYOUT_MAX_SMEM // 4


def check_layout_smem(num_experts: int, num_ranks: int, num_nodes: int = 0) -> None:
    """ValueError if the layout kernel's counters (E + R + nodes ints) exceed LAYOUT_MAX_SMEM."""
    n = num_experts + num_ranks + num_nodes
    if n > LAYOUT_MAX_COUNTERS:
        raise ValueError(f"num_experts={num_experts} with num_ranks={num_ranks}: the layout kernel counts "
                         f"{n} experts, ranks and nodes in shared memory, at most {LAYOUT_MAX_COUNTERS} "
                         f"({LAYOUT_MAX_SMEM // 1024} KiB); compute is_token_in_rank and num_tokens_per_expert "
                         f"yourself and pass them to dispatch")


def check_layout_args(num_tokens: int, num_experts: int, num_ranks: int, num_ranks_per_node: int) -> int:
    """Validate the integer arguments; returns the number of nodes (0 within one node).

    Accepts Python and NumPy ints (callers convert with check_int before using the values);
    raises TypeError for other types, ValueError for non-positive sizes, E not a multiple of R,
    R above ``num_ranks_per_node`` but not a multiple of it, or E + R + nodes above
    LAYOUT_MAX_COUNTERS (the kernel's shared memory)."""
    num_experts = check_int("num_experts", num_experts, lo=1)
    num_ranks = check_int("num_ranks", num_ranks, lo=1)
    num_ranks_per_node = check_int("num_ranks_per_node", num_ranks_per_node, lo=1)
    check_experts_divisible(num_experts, num_ranks, "num_ranks")
    nodes = 0
    if num_ranks > num_ranks_per_node:
        if num_ranks % num_ranks_per_node:
            raise ValueError(f"num_ranks={num_ranks} spans nodes but is not a multiple of "
                             f"num_ranks_per_node={num_ranks_per_node}")
        nodes = num_ranks // num_ranks_per_node
    check_layout_smem(num_experts, num_ranks, nodes)
    return nodes


def launch_layout(stream: int, device_id: int, topk: interop.TensorRef, num_experts: int, num_ranks: int,
                  num_nodes: int, ranks_per_node: int, out_rank: interop.TensorRef,
                  out_rdma: interop.TensorRef | None, out_expert: interop.TensorRef,
                  out_in_rank: interop.TensorRef, err_dev_ptr: int) -> None:
    """Zero the counters and launch the layout kernel on ``stream`` (outputs preallocated)."""
    N, K = topk.shape
    driver.memset_d32_async(out_rank.ptr, 0, num_ranks, stream)
    driver.memset_d32_async(out_expert.ptr, 0, num_experts, stream)
    if out_rdma is not None:
        driver.memset_d32_async(out_rdma.ptr, 0, num_nodes, stream)
    if N == 0:
        return
    mod = loader.load(LayoutSpec(), device_id)
    p = LayoutParams(topk.ptr, out_rank.ptr, out_rdma.ptr if out_rdma is not None else 0, out_expert.ptr,
                     out_in_rank.ptr, err_dev_ptr, N, K, num_experts, num_ranks, ranks_per_node, num_nodes)
    grid = min((N + THREADS - 1) // THREADS, 4 * driver.num_sms(device_id))
    smem = 4 * (num_experts + num_ranks + num_nodes)
    launch(mod.fn("layout"), grid, THREADS, stream, p, smem=smem)
