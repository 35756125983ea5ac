"""epcomm.deep_ep, the DeepEP V1 drop-in, driven as its users drive DeepEP, against epcomm.reference.

Each scenario replays the call sequence of one user of DeepEP (written here from reading their
public source; none of their code is used), on a Buffer created and sized as that user does
(DeepEP's Config hints or a fixed size; a torch.distributed gloo group, like vLLM's CPU group),
and checks every rank's outputs bit for bit against the reference of the whole job:

* vllm_ht: vLLM's DeepEP high-throughput prepare/finalize (on the Buffer its all2all manager
  makes: 1 GiB, ``explicitly_destroy=True``): synchronous ``get_dispatch_layout`` and
  ``dispatch`` (BF16, and FP8 with per-128-channel scales) with DeepEP's recommended config, the
  local expert ids mapped back to global ones, an unweighted ``combine`` without weights;
  then the same with ``num_worst_tokens`` (the CUDA-graph form), where the received row count is
  read as DeepEP's users read it, ``handle[0][-1][rank]``.
* vllm_ll: vLLM's DeepEP low-latency prepare/finalize: ``low_latency_dispatch`` (BF16 and FP8)
  and ``low_latency_combine(..., out=output)``, all synchronous; the handle's ``layout_range`` in
  DeepEP's packed int64 form.
* sglang: SGLang's DeepEP dispatcher on one Buffer of both modes (its "auto" mode): the normal
  path asynchronous, ordered by ``Buffer.capture()`` events (the inputs are written late on the
  caller's stream, so a call that does not wait for the event reads poison), with
  ``expert_alignment=128`` and a Config built from keyword arguments; then
  ``clean_low_latency_buffer`` and the low-latency path with receive hooks, then with
  ``async_finish``; then the normal path again.
* megatron: Megatron-LM's fused all-to-all (``EventOverlap(EventHandle())`` from
  ``epcomm.deep_ep.utils``): dispatch and combine forward, and their backwards (a cached dispatch
  of the output gradient, a combine of the received rows' and weights' gradients) through a
  handle saved with ``ctx.save_for_backward(*handle)`` and read back from ``ctx.saved_tensors``.
* internode: nodes declared with EPCOMM_RANKS_PER_NODE: ``dispatch`` and ``internode_dispatch``
  route across nodes, the handle has DeepEP's 10 elements, the combine sums node-first.

Marked gpu/multigpu; the normal-mode scenarios need 2 ranks (2 GPUs, or one shared with
EPCOMM_SHARE_GPU=1), vllm_ll runs with one.
"""
from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

from epcomm.tools import spawn
from gpu_checks import (TEST_TIMEOUT, assert_bits, device_of, ll_ranks, needs_ll_ranks, needs_ranks, normal_ranks,
                        random_job, run_once, to_np)

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]

# DeepEP's recommended configs exist for these rank counts (vLLM passes config=None otherwise).
# The drop-in's Buffers follow DeepEP's arithmetic (numerics="deepep"): so does the reference here.
NUMERICS = "deepep"
_DEEPEP_RANKS = (2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144, 160)


# ---- shared helpers (run in the spawned ranks) -----------------------------------------------
def _torch_group(rank, world, group):
    """torch.distributed's default group (gloo) over the spawn's directory: DeepEP's users pass a
    ProcessGroup."""
    import torch.distributed as dist
    if not dist.is_initialized():
        store = os.path.join(os.path.dirname(group.path), "torch-dist-store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    return dist.group.WORLD


def _up(a):
    """A CUDA torch copy of a host array (bf16 / e4m3 as ml_dtypes) on the current device."""
    import torch

    from epcomm import interop
    return interop.from_numpy("torch", a, "cuda", torch.cuda.current_device())


def _deepep_nvl_bytes(world, hidden_bytes):
    """``num_nvl_bytes`` as DeepEP's README sizes it: the larger hint of the recommended dispatch
    and combine configs (a default Config where DeepEP has none for this rank count)."""
    import epcomm.deep_ep as deep_ep
    configs = ((deep_ep.Buffer.get_dispatch_config(world), deep_ep.Buffer.get_combine_config(world))
               if world in _DEEPEP_RANKS else (deep_ep.Config(deep_ep.Buffer.num_sms),))
    return max(c.get_nvl_buffer_size_hint(hidden_bytes, world) for c in configs)


def _job(name, world, N, H, E, K, drop=0.1):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return random_job(rng, world, N, H, E, K, drop)


def _outputs(name, shapes):
    """Deterministic expert outputs (bf16) of the given shapes, the same on every rank."""
    from epcomm.testing import random_bf16
    rng = np.random.default_rng(zlib.crc32(name.encode() + b"/experts"))
    return [random_bf16(rng, s) for s in shapes]


def _late(t):
    """A poisoned copy of ``t`` that the current stream overwrites with ``t`` after a ~30 ms
    sleep: a call ordered only by an event recorded after this reads ``t``; one that runs
    earlier reads the 0x7F poison."""
    import torch
    late = torch.empty_like(t)
    late.view(torch.uint8).fill_(0x7F)
    torch.cuda._sleep(50_000_000)
    late.copy_(t)
    return late


def _check_dispatch(tag, rank, ref, got, fp8, worst=0):
    """The received rows (and scales), indices, weights and counts of one normal dispatch; with
    ``worst`` only the real rows of x, every row of the rest."""
    recv_x, ridx, rw, counts = got
    M = ref.handle.num_recv_tokens
    if fp8:
        recv_x, scales = recv_x
        assert_bits(f"{tag} recv scales", to_np(scales)[:M], ref.recv_x_scales[:M])
    assert_bits(f"{tag} recv_x", to_np(recv_x)[:M], ref.recv_x[:M])
    assert_bits(f"{tag} recv_topk_idx", to_np(ridx), ref.recv_topk_idx)
    assert_bits(f"{tag} recv_topk_weights", to_np(rw), ref.recv_topk_weights)
    want = [] if worst else list(ref.num_recv_tokens_per_expert_list)
    assert counts == want, f"{tag}: per-expert counts {counts}, expected {want}"


def _check_handle(tag, rank, ref, handle):
    """DeepEP's intranode handle: element 0's column ``rank`` and last row, recv_src_idx."""
    m = to_np(handle[0])
    prefix = ref.handle.rank_prefix[1:]
    assert len(handle) == 6, f"{tag}: handle of {len(handle)} elements"
    assert_bits(f"{tag} rank_prefix_matrix[:, rank]", m[:, rank], prefix)
    assert int(handle[0][-1][rank].item()) == ref.handle.num_recv_tokens, f"{tag}: handle[0][-1][rank]"
    assert_bits(f"{tag} recv_src_idx", to_np(handle[3]), ref.handle.recv_src_idx)


def _run(rank, world, group, fn, kw):
    """``fn(rank, world, group, **kw)`` (which returns its drop-in Buffer) as one scenario: "ok",
    or what went wrong.  The ranks then compare notes; when every one passed, the Buffer is
    released here, collectively (otherwise at exit, or never if a peer is stuck)."""
    import torch
    import torch.distributed as dist
    buf = None
    try:
        buf = fn(rank, world, group, **kw)
        torch.cuda.synchronize()
        res = "ok"
    except AssertionError as e:
        res = f"FAIL: {e}"
    except Exception as e:  # noqa: BLE001 - reported
        import traceback
        res = f"ERROR: {type(e).__name__}: {e}\n{traceback.format_exc()}"
    if all(v == b"ok" for v in group.allgather_bytes(b"ok" if res == "ok" else b"bad")):
        if buf.explicitly_destroy:
            buf.destroy()
        else:
            buf.native.destroy()  # DeepEP's destroy() refuses without explicitly_destroy, as ours does
        if dist.is_initialized():
            dist.destroy_process_group()
    return res


# ---- vLLM: high throughput ---------------------------------------------------------------------
def _vllm_ht(rank, world, group, N, H, E, K):
    import torch

    import epcomm.deep_ep as deep_ep
    from epcomm import reference
    tg = _torch_group(rank, world, group)
    # vLLM's all2all manager: a 1 GiB NVLink buffer (VLLM_DEEPEP_BUFFER_SIZE_MB), its CPU group,
    # one queue pair inside a node, released with destroy()
    buf = deep_ep.Buffer(group=tg, num_nvl_bytes=1024 << 20, num_rdma_bytes=0, low_latency_mode=False,
                         num_qps_per_rank=1, explicitly_destroy=True)
    assert buf.group_size == world and buf.rank == rank
    dispatch_cfg = deep_ep.Buffer.get_dispatch_config(world) if world in _DEEPEP_RANKS else None
    combine_cfg = deep_ep.Buffer.get_combine_config(world) if world in _DEEPEP_RANKS else None
    L = E // world
    for fp8 in (False, True):
        for worst in (0, N * world):
            tag = f"{'fp8' if fp8 else 'bf16'}{'/worst' if worst else ''}"
            xs, tks, ws = _job(f"vllm_ht/{tag}", world, N, H, E, K)
            scales = None
            if fp8:
                q = [reference.fp8_quantize(x) for x in xs]
                xs, scales = [a for a, _ in q], [s for _, s in q]
            ref = reference.dispatch(xs, E, topk_idx=tks, topk_weights=ws, x_scales=scales, num_worst_tokens=worst)
            lay = reference.get_dispatch_layout(tks[rank], E, world)
            topk, w = _up(tks[rank]), _up(ws[rank])
            # prepare: the layout, then the dispatch, both synchronous
            ntr, ntrr, nte, itr, _ = buf.get_dispatch_layout(topk_idx=topk, num_experts=E, previous_event=None,
                                                              async_finish=False, allocate_on_comm_stream=False)
            assert ntrr is None, "num_tokens_per_rdma_rank inside one node"
            assert_bits(f"{tag} num_tokens_per_rank", to_np(ntr), lay.num_tokens_per_rank)
            assert_bits(f"{tag} num_tokens_per_expert", to_np(nte), lay.num_tokens_per_expert)
            assert_bits(f"{tag} is_token_in_rank", to_np(itr), lay.is_token_in_rank)
            data = (_up(xs[rank]), _up(scales[rank])) if fp8 else _up(xs[rank])
            data, ids, rw, counts, handle, _ = buf.dispatch(
                x=data, handle=None, num_tokens_per_rank=ntr, num_tokens_per_rdma_rank=ntrr, is_token_in_rank=itr,
                num_tokens_per_expert=nte, topk_idx=topk, topk_weights=w, expert_alignment=1,
                num_worst_tokens=worst, config=dispatch_cfg, previous_event=None, async_finish=False,
                allocate_on_comm_stream=False)
            _check_dispatch(tag, rank, ref[rank], (data, ids, rw, counts), fp8, worst)
            _check_handle(tag, rank, ref[rank], handle)
            # vLLM maps the local ids back to global ones (-1 to an expert of another rank)
            offset = rank * L
            mapped = torch.where(ids == -1, E - 1 if offset == 0 else 0, ids + offset)
            want = np.where(ref[rank].recv_topk_idx == -1, E - 1 if offset == 0 else 0,
                            ref[rank].recv_topk_idx + offset)
            assert_bits(f"{tag} global ids", to_np(mapped), want)
            # finalize: the weighted expert outputs, combined without weights
            ys = _outputs(f"vllm_ht/{tag}", [(r.recv_x.shape[0], H) for r in ref])
            output = torch.empty(N, H, dtype=torch.bfloat16, device="cuda")
            combined, _, _ = buf.combine(x=_up(ys[rank]), handle=handle, topk_weights=None, config=combine_cfg,
                                         previous_event=None, async_finish=False, allocate_on_comm_stream=False)
            output.copy_(combined, non_blocking=True)
            assert_bits(f"{tag} combined", to_np(output),
                        reference.combine(ys, [r.handle for r in ref], numerics=NUMERICS)[rank][0])
            group.barrier()
    return buf


# ---- vLLM: low latency ---------------------------------------------------------------------------
def _check_ll_dispatch(tag, ref, recv_x, count, handle, fp8, T, H, E):
    cnt = to_np(count)
    assert_bits(f"{tag} recv_count", cnt, ref.recv_count)
    data = recv_x[0] if fp8 else recv_x
    got = to_np(data)
    for j, c in enumerate(cnt):
        assert_bits(f"{tag} expert {j} rows", got[j, :c], ref.recv_x[j, :c])
        if fp8:
            assert_bits(f"{tag} expert {j} scales", to_np(recv_x[1])[j, :c], ref.recv_x_scales[j, :c])
        assert_bits(f"{tag} expert {j} src_info", to_np(handle[0])[j, :c], ref.handle.src_info[j, :c])
    src, packed, t, h, e = handle
    assert (t, h, e) == (T, H, E), f"{tag}: handle ints {(t, h, e)}"
    r = ref.handle.layout_range.astype(np.int64)
    assert_bits(f"{tag} layout_range (DeepEP's packing)", to_np(packed), (r[..., 0] << 32) | r[..., 1])


def _vllm_ll(rank, world, group, T, H, E, K):
    import torch

    import epcomm.deep_ep as deep_ep
    from epcomm import reference
    tg = _torch_group(rank, world, group)
    rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(T, H, world, E)
    buf = deep_ep.Buffer(group=tg, num_nvl_bytes=0, num_rdma_bytes=rdma, low_latency_mode=True,
                         num_qps_per_rank=E // world, allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False,
                         explicitly_destroy=True)
    assert not buf.native._ll.partials, "DeepEP's numerics add every row at the source"
    for i, fp8 in enumerate((False, True, False)):  # three rounds: both slots, one reused
        tag = f"{i}/{'fp8' if fp8 else 'bf16'}"
        xs, tks, ws = _job(f"vllm_ll/{tag}", world, T, H, E, K)
        ref = reference.low_latency_dispatch(xs, tks, T, E, use_fp8=fp8, numerics=NUMERICS)
        topk = _up(tks[rank])
        expert_x, expert_num_tokens, handle, event, hook = buf.low_latency_dispatch(
            _up(xs[rank]), topk, T, E, use_fp8=fp8, async_finish=False, return_recv_hook=False)
        assert hook is None and type(event) is deep_ep.EventOverlap
        _check_ll_dispatch(tag, ref[rank], expert_x, expert_num_tokens, handle, fp8, T, H, E)
        ys = _outputs(f"vllm_ll/{tag}", [(E // world, world * T, H)] * world)
        output = torch.empty(T, H, dtype=torch.bfloat16, device="cuda")
        combined, event, hook = buf.low_latency_combine(_up(ys[rank]), topk, _up(ws[rank]), handle, async_finish=False,
                                                        zero_copy=False, return_recv_hook=False, out=output)
        assert combined.data_ptr() == output.data_ptr() and hook is None
        want = reference.low_latency_combine(ys, tks, ws, [r.handle for r in ref], numerics=NUMERICS)[rank]
        assert_bits(f"{tag} combined", to_np(output), want)
        group.barrier()
    return buf


# ---- SGLang: the DeepEP dispatcher, normal and low latency on one Buffer -----------------------
def _sglang_normal(rank, world, group, buf, tag, N, H, E, K, configs):
    import epcomm.deep_ep as deep_ep
    from epcomm import reference
    xs, tks, ws = _job(f"sglang/{tag}", world, N, H, E, K)
    ref = reference.dispatch(xs, E, topk_idx=tks, topk_weights=ws, expert_alignment=128)
    topk = _late(_up(tks[rank]))  # written late on the caller's stream: only the events order it
    x, w = _late(_up(xs[rank])), _up(ws[rank])
    previous_event = deep_ep.Buffer.capture()
    ntr, ntrr, nte, itr, previous_event = buf.get_dispatch_layout(
        topk, E, previous_event=previous_event, async_finish=True, allocate_on_comm_stream=True)
    recv_x, ids, rw, counts, handle, event = buf.dispatch(
        x, topk_idx=topk, topk_weights=w, num_tokens_per_rank=ntr, num_tokens_per_rdma_rank=ntrr,
        is_token_in_rank=itr, num_tokens_per_expert=nte, previous_event=previous_event, async_finish=True,
        allocate_on_comm_stream=True, expert_alignment=128, config=configs[0])
    event.current_stream_wait()
    _check_dispatch(tag, rank, ref[rank], (recv_x, ids, rw, counts), False)
    ys = _outputs(f"sglang/{tag}", [(r.recv_x.shape[0], H) for r in ref])
    y = _late(_up(ys[rank]))
    previous_event = deep_ep.Buffer.capture()
    combined, _, event = buf.combine(y, handle, async_finish=True, previous_event=previous_event,
                                     allocate_on_comm_stream=True, config=configs[1])
    event.current_stream_wait()
    assert_bits(f"{tag} combined", to_np(combined),
                reference.combine(ys, [r.handle for r in ref], numerics=NUMERICS)[rank][0])


def _sglang_ll(rank, world, group, buf, tag, T, H, E, K, hook_mode):
    import epcomm.deep_ep as deep_ep
    from epcomm import reference
    xs, tks, ws = _job(f"sglang/{tag}", world, T - 3, H, E, K)
    ref = reference.low_latency_dispatch(xs, tks, T, E, use_fp8=True, numerics=NUMERICS)
    topk = _up(tks[rank])
    expected_m = (xs[rank].shape[0] * buf.group_size * K + E) // E
    assert expected_m >= 1
    recv, count, handle, event, hook = buf.low_latency_dispatch(
        _up(xs[rank]), topk, T, E, use_fp8=True, async_finish=not hook_mode, return_recv_hook=hook_mode,
        round_scale=False, use_ue8m0=False)
    if hook_mode:
        group.barrier()  # every rank's send half issued before any receive runs
        hook()
    else:
        event.current_stream_wait()
    _check_ll_dispatch(tag, ref[rank], recv, count, handle, True, T, H, E)
    ys = _outputs(f"sglang/{tag}", [(E // world, world * T, H)] * world)
    combined, event, hook = buf.low_latency_combine(x=_up(ys[rank]), topk_idx=topk, topk_weights=_up(ws[rank]),
                                                    handle=handle, async_finish=not hook_mode,
                                                    return_recv_hook=hook_mode)
    if hook_mode:
        hook()
    else:
        event.current_stream_wait()
    assert not buf.native._ll.partials, "DeepEP's numerics add every row at the source"
    want = reference.low_latency_combine(ys, tks, ws, [r.handle for r in ref], numerics=NUMERICS)[rank]
    assert_bits(f"{tag} combined", to_np(combined), want)
    assert type(event) is deep_ep.EventOverlap


def _sglang(rank, world, group, N, T, H, E, K):
    import epcomm.deep_ep as deep_ep
    tg = _torch_group(rank, world, group)
    # SGLang's --deepep-config: Configs from keyword arguments; the buffer sized by their hints
    # and by the low-latency hint, both modes on one Buffer, num_qps_per_rank as SGLang computes it.
    keys = ("num_sms", "num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens",
            "num_max_rdma_chunked_send_tokens", "num_max_rdma_chunked_recv_tokens")
    configs = (deep_ep.Config(**dict(zip(keys, (24, 8, 256, 6, 128)))),
               deep_ep.Config(**dict(zip(keys, (24, 4, 256, 6, 128)))))
    num_nvl = max(c.get_nvl_buffer_size_hint(H * 2, world) for c in configs)
    num_rdma = max(max(c.get_rdma_buffer_size_hint(H * 2, world) for c in configs),
                   deep_ep.Buffer.get_low_latency_rdma_size_hint(T, H, world, E))
    buf = deep_ep.Buffer(tg, num_nvl, num_rdma, low_latency_mode=True, num_qps_per_rank=max(24, E // world),
                         allow_mnnvl=True)
    _sglang_normal(rank, world, group, buf, "normal/1", N, H, E, K, configs)
    group.barrier()
    buf.clean_low_latency_buffer(T, H, E)  # SGLang cleans when switching from the normal mode
    _sglang_ll(rank, world, group, buf, "ll/hook", T, H, E, K, hook_mode=True)
    group.barrier()
    _sglang_ll(rank, world, group, buf, "ll/async", T, H, E, K, hook_mode=False)
    group.barrier()
    _sglang_normal(rank, world, group, buf, "normal/2", N, H, E, K, (None, None))
    return buf


# ---- Megatron-LM: the fused all-to-all, forward and backward ----------------------------------
def _megatron(rank, world, group, N, H, E, K):
    import torch

    import epcomm.deep_ep as deep_ep
    from epcomm import reference
    from epcomm.deep_ep.utils import EventHandle, EventOverlap
    from epcomm.testing import random_bf16
    tg = _torch_group(rank, world, group)
    deep_ep.Buffer.set_num_sms(24)
    buf = deep_ep.Buffer(tg, _deepep_nvl_bytes(world, H * 2), 0)
    xs, tks, ws = _job("megatron", world, N, H, E, K)
    ref = reference.dispatch(xs, E, topk_idx=tks, topk_weights=ws)
    handles = [r.handle for r in ref]

    seen = {}

    class Dispatch(torch.autograd.Function):
        """Megatron's fused dispatch, saving the handle as its tensors (as xtuner does); its
        backward combines through the plain tuple ``ctx.saved_tensors`` gives back."""

        @staticmethod
        def forward(ctx, x, probs, idx):
            prev = EventOverlap(EventHandle())
            ntr, ntrr, nte, itr, ev = buf.get_dispatch_layout(idx, E, previous_event=prev, async_finish=True,
                                                               allocate_on_comm_stream=True)
            recv_x, recv_idx, recv_probs, counts, handle, after = buf.dispatch(
                x, topk_idx=idx, topk_weights=probs, num_tokens_per_rank=ntr, num_tokens_per_rdma_rank=ntrr,
                is_token_in_rank=itr, num_tokens_per_expert=nte, previous_event=ev, async_finish=True,
                allocate_on_comm_stream=True)
            after.current_stream_wait()
            seen.update(counts=torch.tensor(counts), handle=handle)
            ctx.save_for_backward(*handle)
            ctx.mark_non_differentiable(recv_idx)
            return recv_x, recv_idx, recv_probs

        @staticmethod
        def backward(ctx, g_x, _g_idx, g_probs):
            handle = ctx.saved_tensors
            assert type(handle) is tuple and len(handle) == 6
            prev = EventOverlap(EventHandle())
            gx, gprobs, after = buf.combine(g_x.contiguous(), handle, topk_weights=g_probs.float(),
                                            previous_event=prev, async_finish=True, allocate_on_comm_stream=True)
            after.current_stream_wait()
            return gx, gprobs, None

    x = _up(xs[rank]).requires_grad_()
    probs = _up(ws[rank]).requires_grad_()
    recv_x, recv_idx, recv_probs = Dispatch.apply(x, probs, _up(tks[rank]))
    _check_dispatch("megatron forward", rank, ref[rank],
                    (recv_x.detach(), recv_idx, recv_probs.detach(), seen["counts"].tolist()), False)
    handle = seen.pop("handle")
    _check_handle("megatron forward", rank, ref[rank], handle)
    # combine forward, and its backward (a cached dispatch), through the dispatch's handle
    ys = _outputs("megatron/experts", [(r.recv_x.shape[0], H) for r in ref])
    prev = EventOverlap(EventHandle())
    combined, _, after = buf.combine(_up(ys[rank]), handle=handle, async_finish=True, previous_event=prev,
                                     allocate_on_comm_stream=True)
    after.current_stream_wait()
    assert_bits("megatron combine forward", to_np(combined),
                reference.combine(ys, handles, numerics=NUMERICS)[rank][0])
    rng = np.random.default_rng(zlib.crc32(b"megatron/gradients"))
    g_out = [random_bf16(rng, (N, H)) for _ in range(world)]
    prev = EventOverlap(EventHandle())
    grad_x, *none, after = buf.dispatch(_up(g_out[rank]), handle=handle, previous_event=prev, async_finish=True,
                                        allocate_on_comm_stream=True)
    after.current_stream_wait()
    assert none == [None] * 4, f"a cached dispatch returned {none}"
    want = reference.dispatch(g_out, E, is_token_in_rank=[r.handle.is_token_in_rank for r in ref])[rank]
    assert_bits("megatron combine backward (cached dispatch)", to_np(grad_x), want.recv_x)
    # dispatch backward: a combine of the received rows' and weights' gradients (collective)
    g_rx = [random_bf16(rng, (r.handle.num_recv_tokens, H)) for r in ref]
    g_rw = [rng.uniform(0.5, 1.5, size=(r.handle.num_recv_tokens, K)).astype(np.float32) for r in ref]
    torch.autograd.backward([recv_x, recv_probs], [_up(g_rx[rank]), _up(g_rw[rank])])
    gx, gw = reference.combine(g_rx, handles, topk_weights=g_rw, numerics=NUMERICS)[rank]
    assert_bits("megatron dispatch backward x", to_np(x.grad), gx)
    assert_bits("megatron dispatch backward probs", to_np(probs.grad), gw)
    return buf


# ---- across nodes (declared) -------------------------------------------------------------------
def _internode(rank, world, group, N, H, E, K):
    import epcomm
    import epcomm.deep_ep as deep_ep
    from epcomm import reference
    P = int(os.environ["EPCOMM_RANKS_PER_NODE"])
    tg = _torch_group(rank, world, group)
    # DeepEP's hints know nothing of nodes below 8 ranks: epcomm's size this Buffer.
    buf = deep_ep.Buffer(tg, epcomm.Buffer.get_internode_nvl_size_hint(H, world * N),
                         epcomm.Buffer.get_rdma_buffer_size_hint(H, world, N, P))
    assert buf.native.internode, "the Buffer did not take the internode route"
    for call in ("dispatch", "internode_dispatch"):
        xs, tks, ws = _job(f"internode/{call}", world, N, H, E, K)
        ref = reference.dispatch(xs, E, topk_idx=tks, topk_weights=ws)
        lay = reference.get_dispatch_layout(tks[rank], E, world, num_ranks_per_node=P)
        topk = _up(tks[rank])
        ntr, ntrr, nte, itr, _ = buf.get_dispatch_layout(topk, E)
        assert_bits(f"{call} num_tokens_per_rdma_rank", to_np(ntrr), lay.num_tokens_per_rdma_rank)
        recv_x, ids, rw, counts, handle, _ = getattr(buf, call)(
            _up(xs[rank]), topk_idx=topk, topk_weights=_up(ws[rank]), num_tokens_per_rank=ntr,
            num_tokens_per_rdma_rank=ntrr, is_token_in_rank=itr, num_tokens_per_expert=nte)
        _check_dispatch(call, rank, ref[rank], (recv_x, ids, rw, counts), False)
        assert len(handle) == 10 and handle[1] is None, f"{call}: internode handle {len(handle)}"
        assert_bits(f"{call} recv_gbl_rank_prefix_sum", to_np(handle[6]), ref[rank].handle.rank_prefix[1:])
        ys = _outputs(f"internode/{call}", [(r.recv_x.shape[0], H) for r in ref])
        combine = buf.combine if call == "dispatch" else buf.internode_combine
        combined, _, _ = combine(_up(ys[rank]), handle)
        want = reference.combine(ys, [r.handle for r in ref], num_ranks_per_node=P, numerics=NUMERICS)[rank][0]
        assert_bits(f"{call} combined (node-first)", to_np(combined), want)
        group.barrier()
    return buf


# ---- spawns -----------------------------------------------------------------------------------
SCENARIOS = {  # the normal-mode users (2 ranks or more)
    "vllm_ht": (_vllm_ht, dict(N=600, H=2048, E=64, K=8)),
    "vllm_ht_h7168": (_vllm_ht, dict(N=1024, H=7168, E=256, K=8)),
    "sglang": (_sglang, dict(N=500, T=128, H=7168, E=64, K=8)),
    "megatron": (_megatron, dict(N=400, H=2048, E=32, K=4)),
}
OTHERS = {
    "vllm_ll": (_vllm_ll, dict(T=128, H=7168, E=64, K=8)),
    "internode": (_internode, dict(N=300, H=2048, E=64, K=8)),
}


def _worker(rank, world, group, name):
    import torch
    torch.cuda.set_device(device_of(rank))
    fn, kw = {**SCENARIOS, **OTHERS}[name]
    spawn.phase(name)
    return _run(rank, world, group, fn, kw)


@run_once
def _spawn(name, world, env=()):
    return spawn.run(_worker, world, name, timeout=TEST_TIMEOUT.get(), env=dict(env))


def _assert_ok(res):
    bad = [f"rank {r}: {v}" for r, v in enumerate(res) if v != "ok"]
    assert not bad, "\n".join(bad)


@needs_ranks
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_user_call_sequences_against_reference(name):
    _assert_ok(_spawn(name, normal_ranks()))


@needs_ll_ranks
def test_vllm_low_latency_against_reference():
    _assert_ok(_spawn("vllm_ll", ll_ranks()))


@needs_ranks
def test_internode_routes_and_handles():
    w = normal_ranks()
    _assert_ok(_spawn("internode", w, (("EPCOMM_RANKS_PER_NODE", str(max(w // 2, 1))),)))
