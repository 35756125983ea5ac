"""The low-latency calls of the drop-in Buffer (DeepEP V1's names, defaults, argument order and
return arities), on :class:`epcomm.Buffer`'s low-latency mode (the drop-in's Buffer is made with
``numerics="deepep"``: DeepEP V1's FP8 scales and summation orders)."""
from __future__ import annotations

import torch

from epcomm.deep_ep.event import adopt
from epcomm.deep_ep.handles import LowLatencyHandle, native_of


class LowLatencyCalls:
    """DeepEP's low-latency methods; ``self.native`` is the epcomm Buffer."""

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Reset the low-latency flags for calls of up to these sizes (collective; no call may be
        in flight).  Handles of earlier dispatches become stale (their combine raises).  Raises
        TypeError/ValueError for sizes the kernels cannot run or the heap cannot hold,
        BufferStateError while a receive hook is pending or without low-latency mode."""
        self.native.clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                             use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False):
        """DeepEP's low-latency dispatch.

        Args:
            x: bf16 [N, H] torch tensor, N <= ``num_max_dispatch_tokens_per_rank`` (T), H a multiple
               of 128.
            topk_idx: int64 [N, K] (K <= 32; -1: no expert; an expert at most once per row).
            num_experts: E, a multiple of the rank count.
            cumulative_local_expert_recv_stats: None or int32 [E/R]; received rows are added.
            dispatch_wait_recv_cost_stats: None or int64 [R]: nanoseconds (GPU global timer) spent
               waiting for each source rank are added (DeepEP adds clock cycles).
            use_fp8, round_scale, use_ue8m0, async_finish, return_recv_hook: as in DeepEP.

        Returns DeepEP's 5-tuple ``(recv_x, recv_count, handle, event, hook)``: ``recv_x`` bf16
        [E/R, R*T, H] or, with FP8, ``(e4m3 [E/R, R*T, H], scales float32 [E/R, R*T, H/128]``
        (int32 [E/R, R*T, H/512] with UE8M0), column-major in the last two dims); ``recv_count``
        int32 [E/R]; ``handle`` a :class:`~epcomm.deep_ep.handles.LowLatencyHandle`; ``event`` an
        EventOverlap; ``hook`` None unless ``return_recv_hook``.  The results are views of two
        per-Buffer slots, valid until the second next dispatch (DeepEP: the same two-buffer rule).
        Raises TypeError/ValueError for bad arguments, and what
        :meth:`epcomm.Buffer.low_latency_dispatch` raises.
        """
        recv_x, count, handle, event, hook = self.native.low_latency_dispatch(
            x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
            cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats,
            dispatch_wait_recv_cost_stats=dispatch_wait_recv_cost_stats, use_fp8=use_fp8, round_scale=round_scale,
            use_ue8m0=use_ue8m0, async_finish=async_finish, return_recv_hook=return_recv_hook)
        return recv_x, count, LowLatencyHandle(handle), adopt(event), hook

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt: bool = False,
                            zero_copy: bool = False, async_finish: bool = False, return_recv_hook: bool = False,
                            out=None, combine_wait_recv_cost_stats=None):
        """DeepEP's low-latency combine: every token gets the **weighted** sum of its experts'
        rows, bf16 [N, H].

        Args:
            x: bf16 [E/R, R*T, H] expert outputs in the dispatch's packed layout (with
               ``zero_copy``, the tensor of :meth:`get_next_low_latency_combine_buffer`).
            topk_idx, topk_weights: int64 / float32 [N, K], the dispatch's top-k (epcomm routes by
               the dispatch's indices: give a dropped expert weight 0 rather than index -1).
            handle: the dispatch's handle (or a tuple of its elements, element 1 read from it).
            use_logfmt: DeepEP's LogFMT-10 combine (not with ``zero_copy``; epcomm's encoding follows
               the format, not DeepEP's bits: README "Porting from DeepEP").
            combine_wait_recv_cost_stats: None or int64 [R], as in the dispatch.
            out: None or a bf16 [N, H] tensor to write into.

        Returns DeepEP's 3-tuple ``(combined_x, event, hook)``.  Raises TypeError for a handle
        that is not this kind, and what :meth:`epcomm.Buffer.low_latency_combine` raises.
        """
        combined, event, hook = self.native.low_latency_combine(
            x, topk_idx, topk_weights, native_of(handle, LowLatencyHandle), use_logfmt=use_logfmt,
            zero_copy=zero_copy, async_finish=async_finish, return_recv_hook=return_recv_hook, out=out,
            combine_wait_recv_cost_stats=combine_wait_recv_cost_stats)
        return combined, adopt(event), hook

    def get_next_low_latency_combine_buffer(self, handle):
        """The bf16 [E/R, R*T, H] tensor the next combine with ``zero_copy=True`` reads (this
        rank's send buffer of that slot): write the expert outputs into it.  Raises TypeError /
        ValueError for a handle of another kind or Buffer, BufferStateError for a stale one."""
        return self.native.get_next_low_latency_combine_buffer(native_of(handle, LowLatencyHandle))

    # Rank masking (DeepEP's enable_shrink): epcomm.Buffer's update_mask / query_mask / clean_mask,
    # which serve both modes.
    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False):
        """Mask (``mask=True``) or unmask ``rank_to_mask`` (DeepEP's default ``mask=False``
        unmasks).  As :meth:`epcomm.Buffer.update_mask`; BufferStateError without
        ``enable_shrink=True``."""
        self.native.update_mask(rank_to_mask, mask)

    def low_latency_query_mask_buffer(self, mask_status):
        """Fill ``mask_status`` (torch int32 [num_ranks], DeepEP's ``torch.int``, any device)
        with the mask, 1 for a masked rank.  TypeError/ValueError for another type, dtype or
        shape (before anything is read)."""
        if not isinstance(mask_status, torch.Tensor):
            raise TypeError(f"mask_status must be a torch.Tensor, got {type(mask_status).__name__}")
        if mask_status.dtype != torch.int32 or tuple(mask_status.shape) != (self.native.num_ranks,):
            raise ValueError(f"mask_status must be torch.int32 of shape ({self.native.num_ranks},), got "
                             f"{mask_status.dtype} of shape {tuple(mask_status.shape)}")
        mask_status.copy_(torch.from_numpy(self.native.query_mask()))

    def low_latency_clean_mask_buffer(self):
        """Unmask every rank (:meth:`epcomm.Buffer.clean_mask`)."""
        self.native.clean_mask()
