"""The internode engine's memory: this rank's symmetric heap (NVSHMEM), the heaps of the ranks of
its node (peer pointers for the NVLink hop), the private control words and the host-mapped
count record.

One symmetric allocation holds both parts of the Buffer: ``num_rdma_bytes`` (control words and
the regions the network hop writes) and ``num_nvl_bytes`` (the rows each rank stages for its
node's forwarders in a combine).  The layout inside it depends on the hidden size of a call
(:class:`epcomm.kernels.internode.InterLayout`), computed alike on every rank.
"""
from __future__ import annotations

import ctypes

import numpy as np

from epcomm.errors import EpcommError
from epcomm.kernels import internode as K
from epcomm.normal.state import wait_counts
from epcomm.runtime import driver
from epcomm.runtime import nvshmem as nvr


class InternodeState:
    """Symmetric heap, node peers, control words and host record of one Buffer spanning nodes.

    Made collectively (every rank of ``ctx.group``).  ``ranks_per_node``: P; ranks
    ``node * P .. node * P + P - 1`` form a node.
    """

    def __init__(self, ctx, ranks_per_node: int, num_nvl_bytes: int, num_rdma_bytes: int):
        R, P = K.check_topology(ctx.num_ranks, ranks_per_node)
        if num_rdma_bytes <= 0 or num_nvl_bytes <= 0:
            raise ValueError("a Buffer spanning nodes needs num_nvl_bytes > 0 and num_rdma_bytes > 0 for the "
                             "normal mode; see Buffer.get_rdma_buffer_size_hint and "
                             "Buffer.get_internode_nvl_size_hint")
        self.num_ranks, self.rpn, self.num_nodes = R, P, R // P
        self.rank = ctx.rank
        self.node, self.local = ctx.rank // P, ctx.rank % P
        self.num_nvl_bytes, self.num_rdma_bytes = int(num_nvl_bytes), int(num_rdma_bytes)
        K.InterLayout.make(R, P, 128, self.num_rdma_bytes, self.num_nvl_bytes)  # ValueError if too small
        self.heap_bytes = self.num_rdma_bytes + self.num_nvl_bytes + 4096
        self.heap_obj = None
        self.heap = self.ctrl = self.host_info = self.host_info_dev = 0
        self._layouts: dict = {}
        try:
            self._allocate(ctx)
            self.template = self._template(ctx)
        except BaseException:
            with driver.on_device(ctx.device_id):
                self.free(collective=False)
            raise

    def _allocate(self, ctx) -> None:
        with driver.on_device(ctx.device_id):
            nvr.init(ctx.group, ctx.device_id, self.heap_bytes, shared_gpu=ctx.shares_gpu)
            self.heap_obj, self.heap = nvr.alloc(self.heap_bytes)
            driver.memset_d8_async(self.heap, 0, self.heap_bytes, ctx.stream)
            n = ctypes.sizeof(K.InterCtrl)
            self.ctrl = driver.mem_alloc(n)
            driver.memset_d8_async(self.ctrl, 0, n, ctx.stream)
            n_info = 2 + self.num_ranks + K.MAX_LOCAL_EXPERTS
            self.host_info, self.host_info_dev = driver.host_alloc_mapped(4 * n_info)
            ctypes.memset(self.host_info, 0, 4 * n_info)
            self.info = np.frombuffer((ctypes.c_int32 * n_info).from_address(self.host_info), dtype=np.int32)
            driver.stream_sync(ctx.stream)
            first = self.node * self.rpn
            self.peers = [self.heap if r == ctx.rank else nvr.peer_ptr(self.heap_obj, r)
                          for r in range(first, first + self.rpn)]
        missing = [first + j for j, ptr in enumerate(self.peers) if ptr == 0]
        # Every rank must know before anyone fails alone (the others would wait in a later call).
        bad = ctx.group.allgather_bytes(",".join(map(str, missing)).encode())
        bad = {r: b.decode() for r, b in enumerate(bad) if b}
        if bad:
            raise EpcommError(f"ranks of one node must reach each other's memory (NVLink or PCIe peer access); "
                              f"unreachable, per rank: {bad}.  Check the node size (EPCOMM_RANKS_PER_NODE)")
        ctx.group.barrier()  # every heap is zeroed before anyone writes into it

    def _template(self, ctx) -> K.InterParams:
        t = K.InterParams()
        for j, ptr in enumerate(self.peers):
            t.peer_base[j] = ptr
        t.heap, t.ctrl, t.err, t.host_info = self.heap, self.ctrl, ctx.err.dev_ptr, self.host_info_dev
        t.rank, t.num_ranks, t.rpn, t.num_nodes = ctx.rank, self.num_ranks, self.rpn, self.num_nodes
        t.node, t.local = self.node, self.local
        t.max_chunks = K.MAX_CHUNKS
        return t

    def layout(self, hidden: int) -> K.InterLayout:
        lay = self._layouts.get(hidden)
        if lay is None:
            lay = self._layouts[hidden] = K.InterLayout.make(self.num_ranks, self.rpn, hidden, self.num_rdma_bytes,
                                                             self.num_nvl_bytes)
        return lay

    def chunk_rows(self, lay: K.InterLayout, wanted: int) -> int:
        """Rows per chunk flag: ``wanted``, raised so that a full region needs at most MAX_CHUNKS."""
        return min(K.MAX_CHUNK_ROWS, max(int(wanted), -(-lay.ncap // K.MAX_CHUNKS), 1))

    def params(self, lay: K.InterLayout, timeout_s: float) -> K.InterParams:
        """A fresh copy of the launch parameters' constant part, with the layout and deadline."""
        p = K.InterParams()
        ctypes.pointer(p)[0] = self.template
        for name in ("hdr_flag_off", "hdr_off", "hdr_stage_off", "disp_ack_off", "disp_flag_off", "stage_flag_off",
                     "stage_ack_off", "comb_ack_off", "comb_flag_off", "offsets_off", "disp_recv_off",
                     "disp_send_off", "comb_recv_off", "comb_send_off", "stage_off", "ncap", "stage_rows",
                     "msg_stride", "part_stride", "stage_stride", "hdr_stride"):
            setattr(p, name, getattr(lay, name))
        p.timeout_ns = int(timeout_s * 1e9)
        return p

    def wait_counts(self, ctx, what: str) -> None:
        wait_counts(self.info, ctx, what)

    def free(self, collective: bool = True) -> None:
        """Free the control words and host record; the symmetric heap only if ``collective``
        (its free is a barrier every rank must join: destroy() does, a constructor that raised
        does not)."""
        for attr, free in (("ctrl", driver.mem_free), ("host_info", driver.host_free)):
            ptr = getattr(self, attr, 0)
            if ptr:
                try:
                    free(ptr)
                except Exception:
                    pass
                setattr(self, attr, 0)
        if collective and self.heap_obj is not None:
            try:
                nvr.free(self.heap_obj)
            except Exception:
                pass
            self.heap_obj = None
