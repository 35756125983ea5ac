"""Functions that need no Buffer."""
from __future__ import annotations

import contextlib

from epcomm import interop
from epcomm.interop.indices import check_topk_indices
from epcomm.kernels import layout as K_layout
from epcomm.runtime import driver, streams
from epcomm.runtime.errstate import default_state
from epcomm.validate import check_int


def get_dispatch_layout(topk_idx, num_experts: int, num_ranks: int, *, num_ranks_per_node: int = 8,
                        stream: int | None = None):
    """Routing counts of one rank's tokens, on the caller's current stream.

    Args:
        topk_idx: int64 (or int32) [N, K] CUDA tensor (torch, CuPy or JAX); -1 marks an unused slot.
        num_experts: E, a multiple of ``num_ranks``; expert e lives on rank e // (E / num_ranks).
        num_ranks: R.
        num_ranks_per_node: ranks per NVLink node; with R above it, per-node counts are returned.
        stream: raw CUDA stream handle to run on (default: the framework's current stream).
            It must be ordered after the work that writes topk_idx (the host index check,
            EPCOMM_CHECK_INDICES, reads topk_idx on the current stream), and the caller orders
            its readers of the outputs after it.  torch outputs are recorded on it
            (record_stream); CuPy outputs are allocated on it.

    Returns ``(num_tokens_per_rank int32 [R], num_tokens_per_rdma_rank int32 [R/8] or None,
    num_tokens_per_expert int32 [E], is_token_in_rank bool [N, R])`` in the caller's framework.
    A token counts once per rank even if several of its experts live there.

    Raises TypeError/ValueError for a wrong dtype, shape, device, ``stream`` (not an int >= 0)
    or an index outside [-1, E)
    (the host check is on by default: EPCOMM_CHECK_INDICES), and ValueError if E + R + nodes
    exceeds 12288 (the kernel's counters in 48 KiB of shared memory).
    """
    tr = interop.as_index_tensor(topk_idx, "topk_idx", ndim=2, device="cuda")
    num_nodes = K_layout.check_layout_args(tr.shape[0], num_experts, num_ranks, num_ranks_per_node)
    num_experts, num_ranks = int(num_experts), int(num_ranks)  # NumPy ints: checked above
    num_ranks_per_node = int(num_ranks_per_node)
    if stream is not None:
        stream = check_int("stream", stream, lo=0)
    fw, dev = tr.framework, tr.device_id
    with driver.on_device(dev):
        s = streams.current_stream(fw, dev) if stream is None else stream
        widen_s = streams.current_stream("torch" if fw == "torch" else "cupy", dev) if tr.widened else s
        if widen_s != s:
            # An int32 top-k was widened on the current stream: the kernel on `stream` follows
            # that copy (and the copy is kept until the kernel is done, below).
            ev = driver.event_create()
            driver.event_record(ev, widen_s)
            driver.stream_wait_event(s, ev)
            driver.event_destroy(ev)
        err = default_state(dev)
        err.check("get_dispatch_layout")
        check_topk_indices(tr.obj, fw, num_experts, capturing=driver.stream_is_capturing(s))
        outs = _allocate(fw, dev, s, stream is not None, tr.shape[0], num_ranks, num_nodes, num_experts)
        rank_o, rdma_o, exp_o, in_o = outs
        K_layout.launch_layout(s, dev, tr, num_experts, num_ranks, num_nodes, num_ranks_per_node, rank_o[1],
                               rdma_o[1] if rdma_o else None, exp_o[1], in_o[1], err.dev_ptr)
        if widen_s != s:
            # The widened copy (allocated on the current stream) is read on `s`.
            if fw == "torch":
                interop.record_on_stream([tr.keepalive], s, dev)
            else:
                driver.stream_sync(s)  # CuPy's pool has no record_stream: the copy may go once `s` is done
    fin = lambda o: None if o is None else interop.finish(fw, o[0], s)  # noqa: E731
    return fin(rank_o), fin(rdma_o), fin(exp_o), fin(in_o)


def _allocate(fw: str, dev: int, s: int, explicit: bool, N: int, num_ranks: int, num_nodes: int,
              num_experts: int) -> list:
    """The four outputs ((obj, ref) pairs; the per-node one None without nodes).  With an explicit
    ``stream``: CuPy allocates them on it (CuPy has no record_stream: the caller's consumers must
    then be done before ``s`` allocates again); torch records them on it, since they are written
    on ``s`` and read on the caller's stream, and torch's allocator must wait for both before
    reusing one (a caller may drop an unused output at once)."""
    on_s = interop.allocating_on(fw, s, dev) if explicit and fw == "cupy" else contextlib.nullcontext()
    with on_s:
        mk = lambda shape, dt: interop.empty(fw, shape, dt, "cuda", dev)  # noqa: E731
        outs = [mk((num_ranks,), "int32"), mk((num_nodes,), "int32") if num_nodes else None,
                mk((num_experts,), "int32"), mk((N, num_ranks), "bool")]
    if explicit and fw == "torch" and s != streams.current_stream(fw, dev):
        interop.record_on_stream([o[0] for o in outs if o is not None], s, dev)
    return outs
