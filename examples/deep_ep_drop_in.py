"""DeepEP's README usage, run on epcomm: the only change to such code is the import.

    from deep_ep import Buffer, EventOverlap          ->  from epcomm.deep_ep import Buffer, EventOverlap

The functions below make the calls of DeepEP V1's README examples (model training / inference
prefilling: a buffer sized by DeepEP's config hints, asynchronous layout and dispatch, combine,
and both backwards; inference decoding: the low-latency dispatch and combine with receive
hooks), with the same names, arguments and return values.  ``main`` runs them on every rank
of a torch.distributed (gloo) group and checks each result bit for bit against
epcomm.reference.

Run: python examples/deep_ep_drop_in.py  (one rank per GPU, or 2 ranks sharing one GPU with
EPCOMM_SHARE_GPU=1)
"""
import os
import sys
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist

from epcomm.deep_ep import Buffer, EventOverlap

# ---- training / prefilling (DeepEP README: "Example use in model training or inference prefilling")
_buffer: Optional[Buffer] = None

Buffer.set_num_sms(24)  # class-wide, as in DeepEP


def get_buffer(group: dist.ProcessGroup, hidden_bytes: int) -> Buffer:
    """The normal-mode buffer, sized by DeepEP's hints for the recommended configs."""
    global _buffer
    num_nvl_bytes, num_rdma_bytes = 0, 0
    for config in (Buffer.get_dispatch_config(group.size()), Buffer.get_combine_config(group.size())):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, group.size()), num_rdma_bytes)
    if (_buffer is None or _buffer.group != group or _buffer.num_nvl_bytes < num_nvl_bytes
            or _buffer.num_rdma_bytes < num_rdma_bytes):
        _buffer = Buffer(group, num_nvl_bytes, num_rdma_bytes)
    return _buffer


def get_hidden_bytes(x: torch.Tensor) -> int:
    t = x[0] if isinstance(x, tuple) else x
    return t.size(1) * max(t.element_size(), 2)


def dispatch_forward(x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], topk_idx: torch.Tensor,
                     topk_weights: torch.Tensor, num_experts: int, previous_event: Optional[EventOverlap] = None):
    """Layout, then dispatch, both asynchronous; the caller waits for the returned event."""
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, previous_event = \
        _buffer.get_dispatch_layout(topk_idx, num_experts, previous_event=previous_event, async_finish=True,
                                    allocate_on_comm_stream=previous_event is not None)
    recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event = \
        _buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=num_tokens_per_rank,
                         num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
                         num_tokens_per_expert=num_tokens_per_expert, previous_event=previous_event,
                         async_finish=True, allocate_on_comm_stream=True)
    return recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event


def dispatch_backward(grad_recv_x: torch.Tensor, grad_recv_topk_weights: torch.Tensor, handle: Tuple):
    """The backward of a dispatch is a combine through its handle."""
    combined_grad_x, combined_grad_recv_topk_weights, event = \
        _buffer.combine(grad_recv_x, handle, topk_weights=grad_recv_topk_weights, async_finish=True)
    return combined_grad_x, combined_grad_recv_topk_weights, event


def combine_forward(x: torch.Tensor, handle: Tuple, previous_event: Optional[EventOverlap] = None):
    combined_x, _, event = _buffer.combine(x, handle, async_finish=True, previous_event=previous_event,
                                           allocate_on_comm_stream=previous_event is not None)
    return combined_x, event


def combine_backward(grad_combined_x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], handle: Tuple,
                     previous_event: Optional[EventOverlap] = None):
    """The backward of a combine is a dispatch along the same route (the handle's)."""
    grad_x, _, _, _, _, event = _buffer.dispatch(grad_combined_x, handle=handle, async_finish=True,
                                                 previous_event=previous_event,
                                                 allocate_on_comm_stream=previous_event is not None)
    return grad_x, event


# ---- decoding (DeepEP README: "Example use in inference decoding") ------------------------------
_ll_buffer: Optional[Buffer] = None


def get_low_latency_buffer(group: dist.ProcessGroup, num_max_dispatch_tokens_per_rank: int, hidden: int,
                           num_experts: int) -> Buffer:
    global _ll_buffer
    num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, group.size(),
                                                           num_experts)
    if (_ll_buffer is None or _ll_buffer.group != group or not _ll_buffer.low_latency_mode
            or _ll_buffer.num_rdma_bytes < num_rdma_bytes):
        assert num_experts % group.size() == 0
        _ll_buffer = Buffer(group, 0, num_rdma_bytes, low_latency_mode=True,
                            num_qps_per_rank=num_experts // group.size())
    return _ll_buffer


def low_latency_dispatch(hidden_states: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                         num_experts: int):
    """Sends only; the data arrive when the returned hook is called."""
    recv_hidden_states, recv_expert_count, handle, event, hook = \
        _ll_buffer.low_latency_dispatch(hidden_states, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                                        async_finish=False, return_recv_hook=True)
    return recv_hidden_states, recv_expert_count, handle, event, hook


def low_latency_combine(hidden_states: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                        handle: Tuple):
    combined_hidden_states, event_overlap, hook = \
        _ll_buffer.low_latency_combine(hidden_states, topk_idx, topk_weights, handle, async_finish=False,
                                       return_recv_hook=True)
    return combined_hidden_states, event_overlap, hook


# ---- the run: every rank, checked against epcomm.reference --------------------------------------
N, T, H, E, K = 1024, 128, 7168, 64, 8
# epcomm.deep_ep's Buffers follow DeepEP's arithmetic (FP8 scales, sums): the reference is asked for the same.
NUMERICS = "deepep"


def _inputs(world: int, tokens: int, seed: int) -> List[tuple]:
    """Every rank's bf16 tokens, top-k and weights (each rank builds all ranks' for the reference)."""
    from epcomm.testing import random_bf16, random_topk, random_weights
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(world):
        tk = random_topk(rng, tokens, E, K, drop_prob=0.05)
        out.append((random_bf16(rng, (tokens, H)), tk, random_weights(rng, tk)))
    return out


def _same(got: torch.Tensor, want: np.ndarray) -> bool:
    from epcomm import interop
    return bool(np.array_equal(interop.to_numpy(got).view(np.uint8), np.ascontiguousarray(want).view(np.uint8)))


def _check_training(rank: int, world: int, group) -> List[str]:
    import ml_dtypes

    from epcomm import interop, reference
    from epcomm.testing import random_bf16
    up = lambda a: interop.from_numpy("torch", a, "cuda", torch.cuda.current_device())  # noqa: E731
    ins = _inputs(world, N, 1)
    xs, tks, ws = (list(v) for v in zip(*ins))
    x, topk_idx, topk_weights = (up(a) for a in ins[rank])
    get_buffer(group, get_hidden_bytes(x))
    recv_x, recv_idx, recv_w, counts, handle, event = dispatch_forward(x, topk_idx, topk_weights, E,
                                                                       previous_event=Buffer.capture())
    event.current_stream_wait()
    ref = reference.dispatch(xs, E, topk_idx=tks, topk_weights=ws)
    rr = ref[rank]
    fails = [what for what, ok in (
        ("recv_x", _same(recv_x, rr.recv_x)), ("recv_topk_idx", _same(recv_idx, rr.recv_topk_idx)),
        ("recv_topk_weights", _same(recv_w, rr.recv_topk_weights)),
        ("counts", counts == list(rr.num_recv_tokens_per_expert_list)),
        ("handle[0][-1][rank]", int(handle[0][-1][rank]) == rr.handle.num_recv_tokens)) if not ok]
    y = (recv_x.float() * 2).to(torch.bfloat16)  # the experts
    combined, event = combine_forward(y, handle, previous_event=Buffer.capture())
    event.current_stream_wait()
    ys = [(r.recv_x.astype(np.float32) * 2).astype(ml_dtypes.bfloat16) for r in ref]
    handles = [r.handle for r in ref]
    if not _same(combined, reference.combine(ys, handles, numerics=NUMERICS)[rank][0]):
        fails.append("combined_x")
    rng = np.random.default_rng(2)
    g_out = [random_bf16(rng, (N, H)) for _ in range(world)]
    g_rx = [random_bf16(rng, (r.handle.num_recv_tokens, H)) for r in ref]
    g_rw = [rng.uniform(0.5, 1.5, size=(r.handle.num_recv_tokens, K)).astype(np.float32) for r in ref]
    grad_x, event = combine_backward(up(g_out[rank]), handle)
    event.current_stream_wait()
    want = reference.dispatch(g_out, E, is_token_in_rank=[r.handle.is_token_in_rank for r in ref])[rank].recv_x
    if not _same(grad_x, want):
        fails.append("combine_backward")
    gx, gw, event = dispatch_backward(up(g_rx[rank]), up(g_rw[rank]), handle)
    event.current_stream_wait()
    wx, ww = reference.combine(g_rx, handles, topk_weights=g_rw, numerics=NUMERICS)[rank]
    if not (_same(gx, wx) and _same(gw, ww)):
        fails.append("dispatch_backward")
    return fails


def _check_decoding(rank: int, world: int, group) -> List[str]:
    import ml_dtypes

    from epcomm import interop, reference
    up = lambda a: interop.from_numpy("torch", a, "cuda", torch.cuda.current_device())  # noqa: E731
    ins = _inputs(world, T, 3)
    xs, tks, ws = (list(v) for v in zip(*ins))
    x, topk_idx, topk_weights = (up(a) for a in ins[rank])
    get_low_latency_buffer(group, T, H, E)
    (q, scales), count, handle, _, hook = low_latency_dispatch(x, topk_idx, T, E)  # FP8 by default
    hook()  # the data arrive now
    ref = reference.low_latency_dispatch(xs, tks, T, E, numerics=NUMERICS)  # use_fp8=True, as the call's default
    rr = ref[rank]
    fails = [] if _same(count, rr.recv_count) else ["recv_count"]
    got_q, got_s = interop.to_numpy(q), interop.to_numpy(scales)
    for j, c in enumerate(rr.recv_count):
        if not (np.array_equal(got_q[j, :c].view(np.uint8), rr.recv_x[j, :c].view(np.uint8))
                and np.array_equal(got_s[j, :c], rr.recv_x_scales[j, :c])):
            fails.append(f"expert {j} rows")
    y = q.float().to(torch.bfloat16)  # the experts (e4m3 values are exact in bf16)
    combined, _, hook = low_latency_combine(y, topk_idx, topk_weights, handle)
    hook()
    ys = [r.recv_x.astype(np.float32).astype(ml_dtypes.bfloat16) for r in ref]
    want = reference.low_latency_combine(ys, tks, ws, [r.handle for r in ref], numerics=NUMERICS)[rank]
    if not _same(combined, want):
        fails.append("low-latency combined")
    return fails


def worker(rank, world, group):
    from epcomm.tools import spawn
    torch.cuda.set_device(spawn.device_of(rank))
    store = os.path.join(os.path.dirname(group.path), "torch-dist-store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    pg = dist.group.WORLD
    fails = _check_training(rank, world, pg) + _check_decoding(rank, world, pg)
    torch.cuda.synchronize()
    group.barrier()
    for b in (_buffer, _ll_buffer):
        b.native.destroy()  # (at exit otherwise, as DeepEP's destructor would)
    dist.destroy_process_group()
    return {"rank": rank, "ok": not fails, "failed": fails}


if __name__ == "__main__":
    from epcomm.tools import spawn
    sys.exit(spawn.run_example(worker, 2, divides=E, timeout=600))
