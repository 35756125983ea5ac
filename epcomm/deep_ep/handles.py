"""DeepEP's handle tuples around epcomm's handles, and back.

A DeepEP handle is a plain tuple whose elements callers may unpack, index or save (e.g.
``ctx.save_for_backward(*handle)``).  The drop-in returns tuple subclasses with DeepEP's arity
and element meanings, built without a kernel, and carries epcomm's handle twice: as ``.native``
of the tuple, and as an attribute of one element the drop-in made for this handle (a view of
epcomm's arrays; for a low-latency handle the packed ``layout_range``, once read), so a tuple
rebuilt from the elements still leads back to it (:func:`native_of`).  An element epcomm has no counterpart of is None.  vLLM, SGLang,
Megatron-LM, xtuner and FastDeploy (their public source, read in writing this) pass handles back
untouched, save them (``ctx.save_for_backward(*handle)``) or unpack them without use; the
elements that are read (by DeepEP's own tests and by callers of ``num_worst_tokens`` dispatches,
``handle[0][-1][rank]`` being the received row count) are all here: ``rank_prefix_matrix``
``[i][rank]``, the internode ``recv_gbl_rank_prefix_sum`` (``handle[-4]``), and the low-latency
``src_info`` and ``layout_range``.

Intranode (6): ``(rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix,
recv_src_idx, is_token_in_rank, send_head)``:

* ``rank_prefix_matrix`` int32 [R, R]: on the receiving rank DeepEP defines column ``rank``
  only (``m[i][rank]``: rows received from ranks 0..i; its notify kernel writes no other column
  there, ``csrc/kernels/intranode.cu``).  Here it is a read-only broadcast view (strides
  ``(1, 0)``) of epcomm's receive offsets ``rank_prefix[1:]`` (int32 [R+1], exclusive): every
  column holds that same column.  No all-gather: no rank needs another rank's row.
* ``recv_src_idx`` int32 [rows] (source token index of each received row, -1 on padding rows
  of a ``num_worst_tokens`` dispatch) and ``is_token_in_rank`` bool [N, R]: epcomm's, same
  meaning.
* ``channel_prefix_matrix``, ``recv_channel_prefix_matrix``, ``send_head``: None.  They index
  DeepEP's per-channel ring buffers; epcomm has no channels (its combine retraces the dispatch
  with ``send_pos``, each token's index among the tokens sent to each rank: another meaning).

Internode (10): ``(is_token_in_rank, rdma_channel_prefix_matrix, gbl_channel_prefix_matrix,
recv_rdma_channel_prefix_matrix, recv_rdma_rank_prefix_sum, recv_gbl_channel_prefix_matrix,
recv_gbl_rank_prefix_sum, recv_src_meta, send_rdma_head, send_nvl_head)``: ``is_token_in_rank``
and ``recv_gbl_rank_prefix_sum`` int32 [R] (inclusive prefix of the rows received from each
global rank: a view of ``rank_prefix[1:]``) are epcomm's; the channel matrices, ring heads and
``recv_src_meta`` (DeepEP's per-row source bitmask) have no counterpart, and
``recv_rdma_rank_prefix_sum`` (per node, at the forwarder) would need a kernel per dispatch:
None.

Low latency (5): ``(src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden,
num_experts)``.  ``src_info`` int32 [L, R*T] is epcomm's (source token index of each packed
row).  ``layout_range`` is DeepEP's int64 [L, R]: ``pack2<int, int64_t>(count, begin)``
(``csrc/kernels/internode_ll.cu``, ``csrc/kernels/utils.cuh``) stores the count in the low and
the row where that source's rows begin in the high 32 bits, i.e. ``begin << 32 | count``;
epcomm's is int32 [L, R, 2] = (begin, count).  The packed form takes kernels, so it is made on
access (``handle[1]``, iterating or unpacking the tuple), on torch's current stream: read it
where the dispatch's outputs may be read (after its event or receive hook).  Nothing on the
dispatch/combine path reads it.
"""
from __future__ import annotations

import operator

import torch

from epcomm.internode.handle import InternodeHandle as NativeInternodeHandle
from epcomm.low_latency.handle import LowLatencyHandle as NativeLowLatencyHandle
from epcomm.normal.handle import DispatchHandle as NativeDispatchHandle

# The attribute of a handle's element made by the drop-in that leads back to epcomm's handle.
CARRIER = "_epcomm_native_handle"

_LOW32 = 0xFFFFFFFF


def _carry(t: torch.Tensor, native) -> torch.Tensor:
    setattr(t, CARRIER, native)
    return t


class IntranodeHandle(tuple):
    """DeepEP's intranode handle (6 elements, module docstring) around epcomm's
    :class:`epcomm.normal.DispatchHandle` (``.native``)."""

    ARITY, NATIVE, WHAT = 6, NativeDispatchHandle, "intranode"

    def __new__(cls, native: NativeDispatchHandle):
        rp = native.rank_prefix  # int32 [R+1], exclusive: the matrix's column is rp[1:]
        R = rp.shape[0] - 1
        matrix = _carry(rp.as_strided((R, R), (rp.stride(0), 0), rp.storage_offset() + rp.stride(0)), native)
        h = super().__new__(cls, (matrix, None, None, native.recv_src_idx, native.is_token_in_rank, None))
        h.native = native
        return h


class InternodeHandle(tuple):
    """DeepEP's internode handle (10 elements, module docstring) around epcomm's
    :class:`epcomm.internode.InternodeHandle` (``.native``)."""

    ARITY, NATIVE, WHAT = 10, NativeInternodeHandle, "internode"

    def __new__(cls, native: NativeInternodeHandle):
        gbl_prefix = _carry(native.rank_prefix[1:], native)  # inclusive prefix per source rank
        h = super().__new__(cls, (native.is_token_in_rank, None, None, None, None, None, gbl_prefix, None, None, None))
        h.native = native
        return h


def pack_layout_range(ranges: torch.Tensor) -> torch.Tensor:
    """epcomm's int32 [..., 2] (begin, count) as DeepEP's int64 [...] ``begin << 32 | count``
    (a new tensor, on the current stream for CUDA tensors).  Raises ValueError for another
    shape or dtype."""
    if ranges.dtype != torch.int32 or ranges.dim() < 1 or ranges.shape[-1] != 2:
        raise ValueError(f"ranges: expected int32 [..., 2] (begin, count), got {ranges.dtype} {tuple(ranges.shape)}")
    r = ranges.to(torch.int64)
    return (r[..., 0] << 32) | (r[..., 1] & _LOW32)


def unpack_layout_range(packed: torch.Tensor) -> torch.Tensor:
    """DeepEP's int64 ``begin << 32 | count`` as epcomm's int32 [..., 2] (begin, count): the
    inverse of :func:`pack_layout_range`.  Raises ValueError for a dtype other than int64."""
    if packed.dtype != torch.int64:
        raise ValueError(f"packed: expected int64, got {packed.dtype}")
    return torch.stack((packed >> 32, packed & _LOW32), dim=-1).to(torch.int32)


class LowLatencyHandle(tuple):
    """DeepEP's low-latency handle (5 elements, module docstring) around epcomm's
    :class:`epcomm.low_latency.LowLatencyHandle` (``.native``).  Element 1 is packed on each
    access (a new tensor); the tuple's own storage holds epcomm's (begin, count) view there,
    which C code reading the tuple directly (not through indexing or iteration) would see."""

    ARITY, NATIVE, WHAT = 5, NativeLowLatencyHandle, "low-latency"

    def __new__(cls, native: NativeLowLatencyHandle):
        h = super().__new__(cls, (native.src_info, native.layout_range, native.num_max_tokens, native.hidden,
                                  native.num_experts))
        h.native = native
        return h

    def _packed(self) -> torch.Tensor:
        return _carry(pack_layout_range(tuple.__getitem__(self, 1)), self.native)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self)[i]
        v = tuple.__getitem__(self, i)  # IndexError / TypeError as for any tuple
        return self._packed() if operator.index(i) % 5 == 1 else v

    def __iter__(self):
        for i in range(5):
            yield self._packed() if i == 1 else tuple.__getitem__(self, i)

    def __repr__(self) -> str:
        n = self.native
        return (f"LowLatencyHandle(src_info={tuple(n.src_info.shape)}, layout_range=packed on access, "
                f"num_max_dispatch_tokens_per_rank={n.num_max_tokens}, hidden={n.hidden}, "
                f"num_experts={n.num_experts})")


def native_of(handle, kind: type):
    """epcomm's handle behind ``handle``: a ``kind`` tuple (:class:`IntranodeHandle`,
    :class:`InternodeHandle` or :class:`LowLatencyHandle`), or a tuple/list of its elements (one
    of them carries it).  Raises TypeError otherwise, naming what was expected."""
    if type(handle) is kind:
        return handle.native
    if isinstance(handle, (tuple, list)) and len(handle) == kind.ARITY:
        for t in tuple.__iter__(handle) if isinstance(handle, tuple) else handle:
            native = getattr(t, CARRIER, None)
            if native is not None:
                if type(native) is kind.NATIVE:  # exact: an internode handle is a DispatchHandle too
                    return native
                break
    raise TypeError(f"handle: expected the {kind.ARITY}-element handle of this Buffer's "
                    f"{kind.WHAT} dispatch (an epcomm.deep_ep {kind.__name__}, or a tuple of its "
                    f"elements), got {type(handle).__name__}"
                    + (f" of {len(handle)} elements" if isinstance(handle, (tuple, list)) else ""))
