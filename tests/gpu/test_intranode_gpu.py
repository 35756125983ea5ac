"""Normal-mode (intranode) dispatch and combine on every visible GPU, against epcomm.reference.

One process per GPU.  All cases run inside one spawn (a spawn costs seconds); each rank builds
every rank's inputs from a shared seed, so it can compute the reference of the whole job and
check its own outputs bit for bit: every received row, scale, index, weight and count, the
handle's fields (rank_prefix, send_pos, is_token_in_rank, recv_src_idx, the row counts) and
every combined value and weight.  Each case also repeats the dispatch, the combine and the
cached dispatch with another SM count, chunk size and send split and checks every output again.

* Outputs are poisoned before each case: the allocator's free memory (its small-block pool
  included, and the comm stream's pool where outputs are allocated there) is filled with 0x7F
  bytes, which no output can hold (not -1 as an index, not 0 as a weight; e4m3 NaN).  In
  num_worst_tokens mode the combine's padding rows hold NaN: a combine that reads one fails.
* previous_event is checked for real: the inputs it orders appear on a side stream only after a
  long sleep that the caller's stream never waits for; async_finish by the caller's stream not
  waiting, and by inputs the caller dropped staying intact until the kernels have read them.
* epcomm.torch_autograd: forward and both backwards, bit for bit against the reference.
* CUDA graphs (separate spawn): BF16 layout + dispatch + combine with a bias + cached dispatch,
  and an FP8 (column-major scales) graph, replayed with new routings around an eager dispatch.

Marked gpu/multigpu: skipped on machines with fewer than 2 GPUs, unless EPCOMM_SHARE_GPU=1,
which runs 2 ranks on a single GPU (correctness only: their kernels take turns).
"""
from __future__ import annotations

import gc
import time
import zlib
import os

import numpy as np
import pytest

from epcomm.tools import spawn
from gpu_checks import (TEST_TIMEOUT, env_var, assert_bits as _assert_bits, assert_every_rank_ok, device_of,
                        needs_ranks, normal_ranks as _world, random_job, run_once, to_np as _np)

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]


def _case(name, **kw):
    # bias_form: how one bias is passed: "bare" tensor, "tuple" (b,), "none_first" (None, b) or
    # "none_last" (b, None); two biases are always a pair.  set_sms: Buffer.set_num_sms for the
    # case (restored afterwards).  alloc_comm: allocate_on_comm_stream on every call.
    # framework "autograd": epcomm.torch_autograd (_run_autograd).
    base = dict(name=name, N=512, H=2048, E=64, K=8, fp8=False, scales="row", routing="random", weights=True,
                alignment=1, worst=0, async_=False, prev_event=False, alloc_comm=False, layout="given", bias=0,
                bias_form="bare", comb_weights=True, cached=True, sms=None, set_sms=None, framework="torch")
    base.update(kw)
    return base


CASES = [
    _case("bf16_h7168_4096tok", N=4096, H=7168, E=256),
    _case("bf16_h7168_8192tok_async", N=8192, H=7168, E=256, async_=True, bias=2),
    # DeepEP's triple on every call (layout, dispatch, combine, cached dispatch): previous_event,
    # async_finish and allocate_on_comm_stream (the internal layout: bf16_heavy_drop, bf16_jax).
    _case("bf16_h4096_prev_event_async_comm_alloc", N=1000, H=4096, E=128, prev_event=True, async_=True,
          alloc_comm=True),
    _case("bf16_h2880_worst_bias_pair", N=777, H=2880, E=64, bias=1, bias_form="none_first", worst=1),
    _case("bf16_h2048_one_token", N=1, H=2048, E=64),
    _case("bf16_rank0_has_no_tokens", N=300, routing="empty_rank", E=64),
    # alignment 7: not a power of 2, and rank 1's experts receive nothing (counts 0 stay 0)
    _case("bf16_all_to_rank0_experts_align7", N=2048, H=4096, E=64, routing="one_rank", alignment=7),
    # combine without weights after a dispatch with weights
    _case("bf16_heavy_drop_internal_layout", N=600, routing="drop50", layout="internal", comb_weights=False),
    _case("bf16_no_topk", N=700, routing="no_topk", comb_weights=False),
    _case("bf16_alignment128", N=900, alignment=128, bias=1, bias_form="tuple"),
    _case("fp8_h2048_no_weights_set_sms10", N=512, fp8=True, weights=False, comb_weights=False, set_sms=10),
    _case("bf16_8sms", N=4096, H=7168, E=256, sms=8),
    _case("bf16_worst_tokens", N=1024, H=4096, E=64, worst=1),
    _case("fp8_h7168_row_scales", N=4096, H=7168, E=256, fp8=True),
    _case("fp8_h4096_col_scales_align128", N=2000, H=4096, E=128, fp8=True, scales="col", alignment=128),
    _case("fp8_h2048_worst_col_async_bias2", N=513, H=2048, E=64, fp8=True, scales="col", worst=1, async_=True,
          bias=2, alloc_comm=True),
    _case("fp8_one_rank_async_8192tok", N=8192, H=7168, E=256, fp8=True, routing="one_rank", async_=True),
    # one token: column-major scales in, row-major out (a [1, G] array is both; buffer.py)
    _case("fp8_one_token_col", N=1, H=2048, E=64, fp8=True, scales="col"),
    _case("fp8_rank0_empty_worst", N=300, H=2048, E=64, fp8=True, routing="empty_rank", worst=1,
          bias=1, bias_form="none_last"),
    _case("fp8_h7168_col", N=700, H=7168, E=256, fp8=True, scales="col"),
    _case("bf16_cupy", N=600, H=2048, E=64, framework="cupy", bias=1),
    _case("fp8_cupy", N=300, H=2048, E=64, fp8=True, framework="cupy"),
    _case("bf16_jax", N=400, H=2048, E=64, framework="jax", layout="internal"),
    _case("bf16_torch_autograd", N=300, H=2048, E=64, framework="autograd"),
    # Speculative outputs (allocated before the counts, sized from the last calls of the shape):
    # every rank but 0 receives nothing, then a random routing (more rows than guessed: exact
    # outputs and a second receive), then nothing again (rows fit, with room).  FP8: two random
    # routings (the second fits), then every token to rank 0 (rank 0 must miss: with top-2 a
    # random routing reaches rank 0 with ~3/4 of the tokens of 2 ranks; with top-8 almost all).
    _case("bf16_speculative_outputs", N=1111, H=4096, E=64, sequence=("one_rank", "random", "one_rank")),
    _case("fp8_speculative_outputs", N=1500, H=7168, E=256, K=2, fp8=True, sequence=("random", "random", "one_rank")),
    # The same with column-major scales: a hit packs the receive's [G, guessed rows] scales into
    # [G, M] (compact_scales); the stride check above holds for every call.
    _case("fp8_col_speculative_outputs", N=1500, H=4096, E=256, K=2, fp8=True, scales="col",
          sequence=("random", "random", "one_rank")),
]

# The repeat of every call (dispatch, combine, cached dispatch) runs with this config, unless
# the case sets its own SM count (then with the Buffer's default): a non-default SM count, chunk
# size and send split must give the same bits.  Valid at every rank count (Config's bounds;
# chunk_rows is raised where a staging region would need more than MAX_CHUNKS chunks).
_REPEAT_CONFIG = dict(num_sms=6, chunk_rows=16, send_fraction=0.5)

# torch.cuda._sleep cycles for the late inputs of the previous_event case: at least _SLEEP_S
# seconds at the H200's highest SM clock (1.98 GHz), longer at lower clocks.
_SLEEP_CYCLES = 400_000_000
_SLEEP_S = 0.2


def _random_fp8(rng, shape):
    """Uniformly random finite e4m3 values (every code but the two NaNs, subnormals and zeros
    included), drawn as bytes: converting float32 draws to e4m3 took seconds per 8192 x 7168."""
    import ml_dtypes
    b = rng.integers(0, 256, size=shape, dtype=np.uint8)
    b[(b & 0x7F) == 0x7F] -= 1  # NaN (S.1111.111) -> 448 / -448
    return b.view(ml_dtypes.float8_e4m3fn)


def _inputs(case, world):
    """Every rank's inputs, from the case's seed (identical in every process)."""
    from epcomm import reference
    from epcomm.testing import random_bf16, random_topk, random_weights
    rng = np.random.default_rng(zlib.crc32(case["name"].encode()))
    E, K, H = case["E"], case["K"], case["H"]
    ins = []
    for r in range(world):
        N = 0 if (case["routing"] == "empty_rank" and r == 0) else case["N"]
        if case["routing"] == "one_rank":
            topk = random_topk(rng, N, E, min(K, E // world), num_ranks=world, only_rank=0)
        else:
            topk = random_topk(rng, N, E, K, drop_prob=0.5 if case["routing"] == "drop50" else 0.1)
        w = random_weights(rng, topk)
        if case["fp8"]:
            q = _random_fp8(rng, (N, H))
            s = (rng.random((N, H // 128)).astype(np.float32) + 0.25)
            x = (q, s)
        else:
            x = random_bf16(rng, (N, H))
        lay = reference.get_dispatch_layout(topk, E, world)
        ins.append(dict(N=N, topk=topk, w=w, x=x, lay=lay))
    return ins


def _fw(case):
    if case["framework"] in ("torch", "autograd"):
        import torch
        up = lambda a: torch.from_numpy(np.ascontiguousarray(a)).cuda()  # noqa: E731

        def up_any(a):
            import ml_dtypes
            if a.dtype == ml_dtypes.bfloat16:
                return up(a.view(np.int16)).view(torch.bfloat16)
            if a.dtype == ml_dtypes.float8_e4m3fn:
                return up(a.view(np.uint8)).view(torch.float8_e4m3fn)
            return up(a)
        return up_any
    from epcomm import interop
    return lambda a: interop.from_numpy(case["framework"], a, "cuda", _DEV[0])


_DEV = [0]


def _poison_tensor(t):
    """Fill a torch tensor's bytes with 0x7F (a column-major one through its transpose)."""
    import torch
    if t.numel():
        (t if t.dim() < 2 or t.stride()[-1] == 1 else t.T).view(torch.uint8).fill_(0x7F)


def _poison(case, world, buf):
    """Fill the free memory of the case's allocator with 0x7F bytes, so that an output element a
    call fails to write is seen: bf16 0x7F7F and float32 0x7F7F7F7F are ~3.4e38 (never a result
    here), e4m3 0x7F is NaN, int32/int64 are huge positive numbers (0xFF bytes would be -1, the
    value of an unused top-k slot or a padding row, and hide a missing write of it).

    torch: every cached block is dropped first (an unpoisoned cached block would be reused before
    the filled one), then one large block is filled (larger outputs split it) and 64 blocks of
    1 MiB: the allocator serves requests up to 1 MiB (index, weight and source outputs, the
    handle's arrays, every output of a small case) from a separate small-block pool.  Blocks
    belong to the stream they were allocated on: with allocate_on_comm_stream the outputs come
    from the comm stream's pool, which is filled the same way.  CuPy: its default pool.  JAX
    outputs are fresh driver allocations (interop.Exporter) and stay unpoisoned.
    """
    fw = case["framework"]
    foot = min(4 << 30, max(512 << 20, 8 * world * max(case["N"], 1) * case["H"] * 2))
    if fw in ("torch", "autograd"):
        import torch
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        streams = [torch.cuda.current_stream()]
        if case["alloc_comm"]:
            streams.append(torch.cuda.ExternalStream(buf.comm_stream, device=torch.device("cuda", _DEV[0])))
        for s in streams:
            with torch.cuda.stream(s):
                held = [torch.empty(foot, dtype=torch.uint8, device="cuda").fill_(0x7F)]
                held += [torch.empty(1 << 20, dtype=torch.uint8, device="cuda").fill_(0x7F) for _ in range(64)]
            torch.cuda.synchronize()
            held.clear()  # back to the pool of stream s, filled
    elif fw == "cupy":
        import cupy
        with cupy.cuda.Device(_DEV[0]):
            cupy.cuda.Device().synchronize()
            cupy.get_default_memory_pool().free_all_blocks()
            held = [cupy.full((foot,), 0x7F, dtype=cupy.uint8)]
            cupy.cuda.Device().synchronize()
            held.clear()


class _Late:
    """Inputs that become ready only on a side stream, after a sleep the caller's stream never
    waits for: a call that reads them right is ordered by its previous_event alone (epcomm's comm
    stream then waits for that event instead of the caller's stream, buffer.py _begin)."""

    def __init__(self, rank):
        import torch
        self.side = torch.cuda.Stream()
        self.dev = device_of(rank)
        self.keep = []  # alive until the case has synchronised (the side stream writes them)
        self.fails = []  # the timing checks' findings, asserted at the end of the case

    def _event(self):
        from epcomm.runtime.driver import event_create, event_record
        from epcomm.runtime.event import EventOverlap
        e = event_create()
        event_record(e, self.side.cuda_stream)
        return EventOverlap(e, "torch", self.dev)

    def sleep(self):
        """(event, t0): an event completing only after a sleep queued at time t0, nothing else."""
        import torch
        t0 = time.monotonic()
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            torch.cuda._sleep(_SLEEP_CYCLES)
        return self._event(), t0

    def copies(self, *ts):
        """(copies, event): poisoned tensors shaped like ``ts`` (None stays None) that receive
        their values on the side stream after a sleep; the event follows the copies."""
        import torch
        self.t0 = time.monotonic()  # before the sleep is queued
        outs = [None if t is None else torch.empty_like(t) for t in ts]
        for o in outs:
            if o is not None:
                _poison_tensor(o)
        self.side.wait_stream(torch.cuda.current_stream())  # after the uploads and the poison
        with torch.cuda.stream(self.side):
            torch.cuda._sleep(_SLEEP_CYCLES)
            for o, t in zip(outs, ts):
                if o is not None:
                    o.copy_(t)
        self.keep += [a for a in list(ts) + outs if a is not None]
        return outs, self._event()


def _pending_check(ev, t0, what):
    """What is wrong, or None: ``ev`` follows work that must wait for a sleep queued at t0, so it
    must still be pending, where that proves something: when this host reached the check well
    before the sleep could end.  (Timing checks report at the end of the case: a rank that stopped
    here would leave its peers waiting in the next collective call until EPCOMM_TIMEOUT_S.)"""
    if time.monotonic() - t0 < _SLEEP_S / 2 and ev.query():
        return what
    return None


def _async_check(ev, t0, what):
    """What is wrong, or None: an async call that waits for a sleep queued at t0 must leave the
    caller's stream free (a synchronous call makes the synchronisation below last until the sleep
    ended), and its event pending."""
    import torch
    t1 = time.monotonic()
    torch.cuda.current_stream().synchronize()
    waited = time.monotonic() - t1
    pending = not ev.query()
    if t1 - t0 < _SLEEP_S / 2 and not (pending and waited < _SLEEP_S / 4):
        return f"{what}: the caller's stream waited for it ({waited:.3f} s; pending afterwards: {pending})"
    return None


def _bias_arg(biases, form):
    if not biases:
        return None
    if len(biases) == 2:
        return tuple(biases)
    b = biases[0]
    return {"bare": b, "tuple": (b,), "none_first": (None, b), "none_last": (b, None)}[form]


def _run_case(rank, world, buf, case):
    if case["framework"] == "autograd":
        return _run_autograd(rank, world, buf, case)
    up = _fw(case)
    ins = _inputs(case, world)
    me = ins[rank]
    E, H = case["E"], case["H"]
    fw = case["framework"]
    async_ = case["async_"]
    _poison(case, world, buf)
    if case["prev_event"]:
        # With the host index check on, the call waits on the host for previous_event before
        # reading topk_idx, so by the launch every late input is ready and the case would prove
        # nothing about the kernels' ordering: it runs with the check off (indices are valid).
        with env_var("EPCOMM_CHECK_INDICES", "0"):
            return _run_case_body(rank, world, buf, case, up, ins, me, E, H, fw, async_, _Late(rank))
    return _run_case_body(rank, world, buf, case, up, ins, me, E, H, fw, async_, None)


def _run_case_body(rank, world, buf, case, up, ins, me, E, H, fw, async_, late):
    import ml_dtypes

    from epcomm import Config, reference
    # Every call's flags; the repeats run with another config (_REPEAT_CONFIG).
    call = dict(async_finish=async_, allocate_on_comm_stream=case["alloc_comm"])
    cfg = Config(num_sms=case["sms"]) if case["sms"] else None
    cfg2 = None if case["sms"] else Config(**_REPEAT_CONFIG)
    # ---- reference of the whole job ----
    xs = [i["x"][0] if case["fp8"] else i["x"] for i in ins]

    def ref_dispatch(worst_rows):
        return reference.dispatch(
            xs, E, topk_idx=None if case["routing"] == "no_topk" else [i["topk"] for i in ins],
            topk_weights=[i["w"] for i in ins] if case["weights"] and case["routing"] != "no_topk" else None,
            x_scales=[i["x"][1] for i in ins] if case["fp8"] else None,
            is_token_in_rank=[i["lay"].is_token_in_rank for i in ins],
            expert_alignment=case["alignment"], num_worst_tokens=worst_rows)

    ref = ref_dispatch(0)
    worst = (max(r.handle.num_recv_tokens for r in ref) + 17) if case["worst"] else 0
    if worst:
        ref = ref_dispatch(worst)
    rr = ref[rank]
    # ---- device inputs ----
    if case["fp8"]:
        q, s = me["x"]
        sd = up(s) if case["scales"] == "row" else up(np.ascontiguousarray(s.T))
        if case["scales"] == "col":
            sd = sd.T
        x = (up(q), sd)
    else:
        x = up(me["x"])
    no_topk = case["routing"] == "no_topk"
    topk = None if no_topk else up(me["topk"])
    w = up(me["w"]) if case["weights"] and not no_topk else None
    kw = dict(topk_idx=topk, topk_weights=w, expert_alignment=case["alignment"], num_worst_tokens=worst)
    if case["layout"] == "given" or no_topk:
        if no_topk:
            kw.update(is_token_in_rank=up(me["lay"].is_token_in_rank),
                      num_tokens_per_rank=up(me["lay"].num_tokens_per_rank), num_experts=E)
        else:
            lay_kw = dict(call)
            if late:
                # The layout's previous_event is a bare sleep (topk_idx itself is on time: the
                # dispatch below reads the same tensor): the layout must not finish before it.
                lay_kw["previous_event"], t0 = late.sleep()
            ntr, nrr, nte, itr, lev = buf.get_dispatch_layout(topk, E, **lay_kw)
            if late:
                time.sleep(0.02)  # a layout that ignored the event would be done by now
                late.fails.append(_pending_check(lev, t0, "get_dispatch_layout finished before its previous_event"))
            if async_:
                lev.current_stream_wait()
            assert nrr is None, "one NVLink domain: no per-node counts"
            _assert_bits("layout.num_tokens_per_rank", _np(ntr), me["lay"].num_tokens_per_rank)
            _assert_bits("layout.num_tokens_per_expert", _np(nte), me["lay"].num_tokens_per_expert)
            # raw bytes: a bool written as anything but 0/1 differs too
            _assert_bits("layout.is_token_in_rank", _np(itr), me["lay"].is_token_in_rank)
            kw.update(num_tokens_per_rank=ntr, is_token_in_rank=itr, num_tokens_per_expert=nte)
    else:
        kw.update(num_experts=E)
    if late:
        # x and the weights appear only after a sleep on a side stream (topk_idx is checked on
        # the host, see above): only a dispatch ordered by previous_event reads them right.
        parts, kw["previous_event"] = late.copies(*(x if case["fp8"] else (x,)), w)
        x = tuple(parts[:2]) if case["fp8"] else parts[0]
        w = kw["topk_weights"] = parts[-1]
    recv_x, rtopk, rw, counts, handle, ev = buf.dispatch(x, config=cfg, **call, **kw)
    if async_:
        ev.current_stream_wait()
    # ---- check dispatch ----
    M = worst or rr.handle.num_recv_tokens
    n_real = rr.handle.num_recv_tokens

    def check_dispatch(what, res, worst_counts=True):
        rx_, rt_, rw_, counts_, h_ = res[:5]
        if case["fp8"]:
            gx_, gs_ = _np(rx_[0]), _np(rx_[1])
            _assert_bits(f"{what} recv_x (fp8)", gx_[:n_real], rr.recv_x[:n_real])
            _assert_bits(f"{what} recv_x_scales", gs_[:n_real], rr.recv_x_scales[:n_real])
            assert gs_.shape == (M, H // 128), f"{what} scales shape {gs_.shape}"
            if case["scales"] == "col" and fw == "torch" and me["N"] > 1:
                # leading dimension exactly M, also from a speculative receive (buffer.py)
                st_ = rx_[1].stride()
                assert st_[0] == 1 and (M <= 1 or st_[1] == M), f"{what}: column-major scales out, strides {st_}"
        else:
            gx_ = _np(rx_)
            assert gx_.shape == (M, H), f"{what} recv_x shape {gx_.shape}, expected {(M, H)}"
            _assert_bits(f"{what} recv_x", gx_[:n_real], rr.recv_x[:n_real])
        if no_topk:
            assert rt_ is None and rw_ is None
        else:
            _assert_bits(f"{what} recv_topk_idx", _np(rt_), rr.recv_topk_idx)
            if case["weights"]:
                _assert_bits(f"{what} recv_topk_weights", _np(rw_), rr.recv_topk_weights)
            else:
                assert rw_ is None
        if worst:
            assert counts_ == [] and h_.num_recv_tokens is None and h_.recv_counts is None
        else:
            assert counts_ == list(rr.num_recv_tokens_per_expert_list), \
                f"{what} expert counts {counts_} != {rr.num_recv_tokens_per_expert_list}"
            assert h_.num_recv_tokens == n_real, f"{what} handle.num_recv_tokens {h_.num_recv_tokens} != {n_real}"
            want = tuple(int(c) for c in np.diff(rr.handle.rank_prefix))
            assert h_.recv_counts == want, f"{what} handle.recv_counts {h_.recv_counts} != {want}"
        assert h_.out_rows == M and h_.num_worst_tokens == worst
        # The handle's arrays have the reference's meaning (buffer.py DispatchHandle, the
        # notify kernel): rank_prefix [R+1] receive offsets per source, send_pos [N, R] slot of
        # each token at each destination or -1, is_token_in_rank as raw bytes.
        _assert_bits(f"{what} handle.recv_src_idx", _np(h_.recv_src_idx), rr.handle.recv_src_idx)
        _assert_bits(f"{what} handle.rank_prefix", _np(h_.rank_prefix), rr.handle.rank_prefix)
        _assert_bits(f"{what} handle.send_pos", _np(h_.send_pos), rr.handle.send_pos)
        _assert_bits(f"{what} handle.is_token_in_rank", _np(h_.is_token_in_rank), rr.handle.is_token_in_rank)

    check_dispatch("dispatch", (recv_x, rtopk, rw, counts, handle))
    # Deterministic: the same dispatch again, with another SM count, chunk size and send split,
    # gives the same bits in every output (on the speculative path of the CPU-synchronised mode).
    d2 = buf.dispatch(x, config=cfg2, allocate_on_comm_stream=case["alloc_comm"], **kw)
    check_dispatch("repeat dispatch", d2)
    # ---- combine: expert d's output row = bf16(float32(row) * (d + 1.5)) ----
    nan = np.float32("nan")
    ys = []
    for d in range(world):
        base = ref[d].recv_x
        if case["fp8"]:
            base = base.astype(np.float32)
        yd = (base.astype(np.float32) * np.float32(d + 1.5)).astype(ml_dtypes.bfloat16)
        yd[ref[d].handle.num_recv_tokens:] = nan  # padding rows (worst mode): never read
        ys.append(yd)
    cw = None
    if case["comb_weights"] and not no_topk and case["weights"]:
        cw = [r.recv_topk_weights.copy() for r in ref]
        for d in range(world):
            cw[d][ref[d].handle.num_recv_tokens:] = nan
    biases = []
    rng = np.random.default_rng(7)
    # With numerics="deepep" the biases span 2**-24 .. 2**24 across channels: bf16 values this
    # far apart round when added in float32, so adding them first (DeepEP) or last shows.
    spread = (2.0 ** ((np.arange(H) % 49) - 24)).astype(np.float32) if buf.numerics == "deepep" else np.float32(1)
    for bi in range(case["bias"]):
        biases.append([(np.asarray(rng.standard_normal((ins[r]["N"], H)), np.float32) * spread).astype(
            ml_dtypes.bfloat16) for r in range(world)])
    cref = reference.combine(ys, [r.handle for r in ref], topk_weights=cw, bias=tuple(biases),
                             numerics=buf.numerics)[rank]
    bias_arg = _bias_arg([up(b[rank]) for b in biases], case["bias_form"])
    y_dev = up(ys[rank])
    cw_dev = up(cw[rank]) if cw else None
    comb_kw = dict(call)
    if late:
        (y_l, cw_l), comb_kw["previous_event"] = late.copies(y_dev, cw_dev)
    else:
        y_l, cw_l = y_dev, cw_dev
    out, outw, ev2 = buf.combine(y_l, handle, topk_weights=cw_l, bias=bias_arg, config=cfg, **comb_kw)
    if late and async_:
        late.fails.append(_async_check(ev2, late.t0, "combine(async_finish=True, previous_event=a late event)"))
    if async_:
        ev2.current_stream_wait()

    def check_combine(what, o, ow):
        _assert_bits(f"{what} combined_x", _np(o), cref[0])
        if cw:
            _assert_bits(f"{what} combined_topk_weights", _np(ow), cref[1])
        else:
            assert ow is None

    check_combine("combine", out, outw)
    c2 = buf.combine(y_dev, handle, topk_weights=cw_dev, bias=bias_arg, config=cfg2,
                     allocate_on_comm_stream=case["alloc_comm"])
    check_combine("repeat combine", c2[0], c2[1])
    # ---- cached dispatch (the backward of combine) with new data ----
    if case["cached"]:
        # new data in every byte: bf16 x * -0.5, FP8 x with its sign flipped (exact, and fast)
        if case["fp8"]:
            x2s = [(i["x"][0].view(np.uint8) ^ np.uint8(0x80)).view(ml_dtypes.float8_e4m3fn) for i in ins]
        else:
            x2s = [(i["x"].astype(np.float32) * np.float32(-0.5)).astype(ml_dtypes.bfloat16) for i in ins]
        ref2 = reference.dispatch(x2s, E, is_token_in_rank=[i["lay"].is_token_in_rank for i in ins],
                                  x_scales=[i["x"][1] for i in ins] if case["fp8"] else None,
                                  num_worst_tokens=worst)[rank]

        def check_cached(what, res):
            got = _np(res[0][0] if case["fp8"] else res[0])
            assert got.shape == (M, H), f"{what} recv_x shape {got.shape}"
            _assert_bits(f"{what} recv_x", got[:n_real], ref2.recv_x[:n_real])
            if case["fp8"]:
                _assert_bits(f"{what} recv_x_scales", _np(res[0][1])[:n_real], ref2.recv_x_scales[:n_real])
            assert res[1] is None and res[2] is None and res[3] == [] and res[4] is handle

        x2 = (up(x2s[rank]), x[1]) if case["fp8"] else up(x2s[rank])
        if late and async_ and not case["fp8"]:
            # The comm stream waits for a sleep before it reads x2, which the caller drops (with
            # the call's event) right after the call: only epcomm keeping x2 alive (record_stream
            # on its streams, the event's references) stops the allocator from handing x2's
            # memory to the garbage written next on the caller's stream.
            sleep_ev, t0 = late.sleep()
            r2 = buf.dispatch(x2, handle=handle, config=cfg, previous_event=sleep_ev, **call)
            late.fails.append(_async_check(r2[5], t0, "cached dispatch(async_finish=True, previous_event=a late "
                                                      "event)"))
            import torch
            shape = tuple(x2.shape)
            del x2
            r2 = r2[:5]  # drops the event, and with it the event's references to x2
            junk = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
            _poison_tensor(junk)
            torch.cuda.synchronize()
            del junk
        else:
            r2 = buf.dispatch(x2, handle=handle, config=cfg, **call)
            if async_:
                r2[5].current_stream_wait()
        check_cached("cached dispatch", r2)
        x3 = (up(x2s[rank]), x[1]) if case["fp8"] else up(x2s[rank])
        r3 = buf.dispatch(x3, handle=handle, config=cfg2, allocate_on_comm_stream=case["alloc_comm"])
        check_cached("repeat cached dispatch", r3)
    if late:
        fails = [f for f in late.fails if f]
        assert not fails, "; ".join(fails)


def _run_autograd(rank, world, buf, case):
    """epcomm.torch_autograd against the reference, bit for bit, forward and backward.

    * forward: dispatch and combine are Buffer's (the combine unweighted, no bias);
    * backward of combine: a cached dispatch of the output gradient (the expert rows' gradient);
    * backward of dispatch: a combine, through the same handle, of the gradients of the received
      rows and weights, the weights' masked to 0 where the received index is -1 (those entries
      were zeros, not copies of a weight): in the reference's order (rank by rank, float32), so
      x.grad and topk_weights.grad are exact too.
    The combine's input is a leaf of its own and the received rows and weights get gradients of
    their own (random, every entry nonzero), so each backward is checked on its own numbers and
    the mask matters: without it the weights' gradient picks up other ranks' entries.
    """
    import ml_dtypes
    import torch

    from epcomm import reference, torch_autograd
    from epcomm.testing import random_bf16
    up = _fw(case)
    ins = _inputs(case, world)
    me = ins[rank]
    E, H, K = case["E"], case["H"], case["K"]
    _poison(case, world, buf)
    ref = reference.dispatch([i["x"] for i in ins], E, topk_idx=[i["topk"] for i in ins],
                             topk_weights=[i["w"] for i in ins])
    handles = [r.handle for r in ref]
    rr = ref[rank]
    x = up(me["x"]).requires_grad_()
    w = up(me["w"]).requires_grad_()
    rx, ridx, rw, counts, h = torch_autograd.dispatch(buf, x, up(me["topk"]), w, E)
    assert rx.grad_fn is not None and rw.grad_fn is not None and not ridx.requires_grad, \
        "dispatch recorded nothing for backward"
    _assert_bits("autograd recv_x", _np(rx), rr.recv_x)
    _assert_bits("autograd recv_topk_idx", _np(ridx), rr.recv_topk_idx)
    _assert_bits("autograd recv_topk_weights", _np(rw), rr.recv_topk_weights)
    _assert_bits("autograd recv_src_idx", _np(h.recv_src_idx), rr.handle.recv_src_idx)
    assert counts == list(rr.num_recv_tokens_per_expert_list), f"autograd expert counts {counts}"
    ys = [(r.recv_x.astype(np.float32) * np.float32(d + 1.5)).astype(ml_dtypes.bfloat16) for d, r in enumerate(ref)]
    y = up(ys[rank]).requires_grad_()
    out = torch_autograd.combine(buf, y, h)
    assert out.grad_fn is not None, "combine recorded nothing for backward"
    _assert_bits("autograd combined_x", _np(out), reference.combine(ys, handles)[rank][0])
    rng = np.random.default_rng(zlib.crc32(case["name"].encode() + b"/gradients"))
    g_out = [random_bf16(rng, (i["N"], H)) for i in ins]
    g_rx = [random_bf16(rng, (r.handle.num_recv_tokens, H)) for r in ref]
    g_rw = [rng.uniform(0.5, 1.5, size=(r.handle.num_recv_tokens, K)).astype(np.float32) for r in ref]
    # Both backwards are collective: every rank runs them in the same order.
    out.backward(up(g_out[rank]))
    want = reference.dispatch(g_out, E, is_token_in_rank=[i["lay"].is_token_in_rank for i in ins])[rank]
    assert y.grad is not None, "combine's backward gave no gradient"
    _assert_bits("autograd grad of combine's x (cached dispatch)", _np(y.grad), want.recv_x)
    torch.autograd.backward([rx, rw], [up(g_rx[rank]), up(g_rw[rank])])
    masked = [np.where(r.recv_topk_idx < 0, np.float32(0), g).astype(np.float32) for r, g in zip(ref, g_rw)]
    gx, gw = reference.combine(g_rx, handles, topk_weights=masked)[rank]
    assert x.grad is not None and w.grad is not None, "dispatch's backward gave no gradient"
    _assert_bits("autograd grad of dispatch's x (combine)", _np(x.grad), gx)
    _assert_bits("autograd grad of dispatch's topk_weights (combine, masked)", _np(w.grad), gw)


def _host_memory_shortfall(case, world):
    """Why this host cannot hold the case's reference in every rank's process, or "".

    Each rank builds the whole job's reference (all ranks' inputs and receives, their combine
    inputs, the cached dispatch's inputs): measured peak ~3.5 x world^2 x N x H x 2 bytes per
    process (CPU, 2 and 4 ranks, 4096 tokens, H 7168).  8 ranks of 8192 tokens need ~26 GB each,
    more than a 128 GB host holds for 8 processes (a rank was killed, EPCOMM_TEST_RANKS=8 on one
    GPU).  The decision only depends on the case and MemTotal, so every rank makes the same one.
    """
    per_rank = 3.5 * world * world * case["N"] * case["H"] * 2
    try:
        with open("/proc/meminfo") as f:
            total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        return ""
    if world * per_rank <= 0.6 * total:
        return ""
    return (f"the reference of {world} ranks x {case['N']} tokens x hidden {case['H']} needs ~"
            f"{world * per_rank / 2**30:.0f} GiB of host memory for {world} processes; this host has "
            f"{total / 2**30:.0f} GiB")


def _worker(rank, world, group, cases, numerics="epcomm"):
    import torch

    import epcomm
    torch.cuda.set_device(device_of(rank))
    _DEV[0] = device_of(rank)
    if any(c["framework"] == "jax" for c in cases):
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    # A worst-mode case asks for 17 rows more than it receives (padding): room for them too, or
    # the dispatch refuses a num_worst_tokens beyond what every rank together can send.
    need = max(epcomm.Buffer.get_nvl_buffer_size_hint(c["H"], world, c["N"] + (17 if c["worst"] else 0), c["K"])
               for c in cases)
    buf = epcomm.Buffer(group, need, numerics=numerics)
    results = {}
    for case in cases:
        spawn.phase(case["name"])
        try:
            if case["framework"] == "cupy":
                import cupy  # noqa: F401
            if case["framework"] == "jax":
                import jax  # noqa: F401
        except ImportError as e:
            results[case["name"]] = f"SKIP: {e}"
            group.barrier()
            continue
        too_big = _host_memory_shortfall(case, world)
        if too_big:
            results[case["name"]] = f"SKIP: {too_big}"
            group.barrier()
            continue
        hits0, misses0 = buf._intra.spec_hits, buf._intra.spec_misses
        sms0 = buf.get_dispatch_config().num_sms  # the default (EPCOMM_NUM_SMS), for dispatch and combine
        try:
            if case["set_sms"]:
                buf.set_num_sms(case["set_sms"])
                got = (buf.get_dispatch_config().num_sms, buf.get_combine_config().num_sms)
                assert got == (case["set_sms"],) * 2, f"set_num_sms({case['set_sms']}): configs have {got}"
            for i, routing in enumerate(case.get("sequence", (case["routing"],))):
                _run_case(rank, world, buf, dict(case, routing=routing, name=f"{case['name']}/{i}")
                          if "sequence" in case else case)
            if "sequence" in case:
                hits, misses = buf._intra.spec_hits - hits0, buf._intra.spec_misses - misses0
                assert hits >= 1, "no dispatch used speculative outputs"
                if case["sequence"][0] == "one_rank":
                    if rank == 0:
                        assert misses == 0, f"rank 0 receives fewer rows after its first call, yet {misses} misses"
                    else:
                        assert misses >= 1, "the random routing's receive fit outputs sized for zero rows"
                elif rank == 0:
                    assert misses >= 1, "rank 0's receive of every token fit outputs sized for a random routing"
            results[case["name"]] = "ok"
        except AssertionError as e:
            results[case["name"]] = f"FAIL: {e}"
        except Exception as e:  # a crash in one case must not hide the others
            import traceback
            results[case["name"]] = f"ERROR: {type(e).__name__}: {e}\n{traceback.format_exc()}"
        finally:
            buf.set_num_sms(sms0)
        torch.cuda.synchronize()
        group.barrier()
        if not results[case["name"]].startswith(("ok", "SKIP", "FAIL")):
            break  # an error may leave the buffer out of step with the peers
    results["peer_memory"] = buf._intra.memory.kind
    buf.destroy()
    return results


@run_once
def _results():
    return spawn.run(_worker, _world(), CASES, timeout=TEST_TIMEOUT.get())


@needs_ranks
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_dispatch_combine_against_reference(case):
    res = _results()
    got = [r.get(case["name"], "not run (an earlier case crashed)") for r in res]
    if any(v.startswith("SKIP") for v in got):
        pytest.skip(next(v for v in got if v.startswith("SKIP")))
    bad = [f"rank {rank}: {v}" for rank, v in enumerate(got) if v != "ok"]
    assert not bad, "\n".join(bad)


# Buffer(numerics="deepep"): the combine adds the biases first (DeepEP V1's order); the cases with
# biases, in every form they can be passed (bare, a pair, None in either place).
DEEPEP_CASES = ["bf16_h2880_worst_bias_pair", "bf16_alignment128", "fp8_h2048_worst_col_async_bias2",
                "fp8_rank0_empty_worst", "bf16_h2048_one_token"]


@run_once
def _results_deepep():
    return spawn.run(_worker, _world(), [c for c in CASES if c["name"] in DEEPEP_CASES], "deepep",
                     timeout=TEST_TIMEOUT.get())


@needs_ranks
@pytest.mark.parametrize("name", DEEPEP_CASES)
def test_deepep_numerics_combine_against_reference(name):
    """The combine of a Buffer with numerics="deepep" against reference.combine(numerics="deepep"),
    biases spread over 2**-24 .. 2**24 so their place in the sum shows in the bf16 results."""
    got = [r.get(name, "not run (an earlier case crashed)") for r in _results_deepep()]
    bad = [f"rank {rank}: {v}" for rank, v in enumerate(got) if v != "ok"]
    assert not bad, "\n".join(bad)


# EPCOMM_PEER_MEMORY=vmm: the NVLink buffer in the driver's virtual memory, shared as file
# descriptors; the same kernels, so a few cases of each kind suffice.
VMM_CASES = ["bf16_h7168_4096tok", "fp8_h2048_worst_col_async_bias2", "bf16_speculative_outputs",
             "bf16_h2048_one_token"]


@run_once
def _results_vmm():
    return spawn.run(_worker, _world(), [c for c in CASES if c["name"] in VMM_CASES], timeout=TEST_TIMEOUT.get(),
                     env={"EPCOMM_PEER_MEMORY": "vmm"})


@needs_ranks
@pytest.mark.parametrize("name", VMM_CASES)
def test_vmm_peer_memory_dispatch_combine_against_reference(name):
    res = _results_vmm()
    assert [r.get("peer_memory") for r in res] == ["vmm"] * len(res)
    got = [r.get(name, "not run (an earlier case crashed)") for r in res]
    bad = [f"rank {rank}: {v}" for rank, v in enumerate(got) if v != "ok"]
    assert not bad, "\n".join(bad)


# ---- CUDA graphs: captured once, replayed with new routing (and an eager call in between) ----
def _graph_worker(rank, world, group):
    """Two graphs on one Buffer, replayed with new routings and inputs:

    * BF16: layout, dispatch (num_worst_tokens), combine with weights and a bias passed as the
      pair (b, None), and a cached dispatch of new data through the captured handle;
    * FP8 with column-major scales and no weights: layout (async, its previous_event recorded
      before the capture), dispatch (after the layout's event), unweighted combine.

    Before every replay the graphs' outputs are filled with 0x7F bytes (a replay writes into the
    tensors of the capture; an unwritten element, a padding row's -1 / 0 / -1 included, shows), so
    the combine's input, computed in the graph from the received rows, has garbage (bf16 inf,
    e4m3 NaN) in the padding rows: a combine that reads one fails.  Between BF16 replays 1 and 2
    an eager, CPU-synchronised dispatch and combine with another routing run on the same Buffer;
    the replays after it must still be right.
    """
    import ml_dtypes
    import torch

    import epcomm
    from epcomm import reference
    from epcomm.runtime.event import EventOverlap
    from epcomm.testing import random_topk
    torch.cuda.set_device(device_of(rank))
    N, H, E, K = 512, 4096, 64, 8
    G = H // 128
    buf = epcomm.Buffer(group, epcomm.Buffer.get_nvl_buffer_size_hint(H, world, N, K))
    worst = N * world
    bf16 = ml_dtypes.bfloat16
    up = lambda a: torch.from_numpy(np.ascontiguousarray(a)).cuda()  # noqa: E731
    sx = torch.zeros(N, H, dtype=torch.bfloat16, device="cuda")
    st = torch.zeros(N, K, dtype=torch.int64, device="cuda") - 1
    sw = torch.zeros(N, K, dtype=torch.float32, device="cuda")
    sb = torch.zeros(N, H, dtype=torch.bfloat16, device="cuda")
    fq = torch.zeros(N, H, dtype=torch.float8_e4m3fn, device="cuda")
    fs = torch.ones(G, N, dtype=torch.float32, device="cuda")  # fs.T: column-major [N, G] scales
    ft = torch.zeros(N, K, dtype=torch.int64, device="cuda") - 1
    s = torch.cuda.Stream()
    outs, fouts = {}, {}

    def body():
        ntr, _, nte, itr, _ = buf.get_dispatch_layout(st, E)
        rx, rt, rw, _, h, _ = buf.dispatch(sx, num_tokens_per_rank=ntr, is_token_in_rank=itr, num_tokens_per_expert=nte,
                                           topk_idx=st, topk_weights=sw, num_worst_tokens=worst)
        y = (rx.float() * 2.0).to(torch.bfloat16)
        o, ow, _ = buf.combine(y, h, topk_weights=rw, bias=(sb, None))
        c2 = buf.dispatch((sx.float() * -0.5).to(torch.bfloat16), handle=h)[0]
        outs.update(rx=rx, rt=rt, rw=rw, o=o, ow=ow, src=h.recv_src_idx, c2=c2, rp=h.rank_prefix, sp=h.send_pos)

    def fbody(pre=None):
        # pre: an event recorded before the capture, as the layout's previous_event (DeepEP's
        # chain: layout async, the dispatch after the layout's event).  It orders nothing inside
        # the graph, and the layout must still be captured, not run once at capture time.
        if pre is not None:
            # Twice: in the capture, the second call finds the comm stream in it already, where
            # a wait for an event from before the capture would invalidate the capture.
            buf.get_dispatch_layout(ft, E, previous_event=pre, async_finish=True)
        ntr, _, nte, itr, lev = buf.get_dispatch_layout(ft, E, previous_event=pre, async_finish=pre is not None)
        (rq, rs), rt, _, _, h, _ = buf.dispatch((fq, fs.T), num_tokens_per_rank=ntr, is_token_in_rank=itr,
                                                num_tokens_per_expert=nte, topk_idx=ft, num_worst_tokens=worst,
                                                previous_event=lev if pre is not None else None)
        o, _, _ = buf.combine((rq.float() * 2.0).to(torch.bfloat16), h)
        fouts.update(rq=rq, rs=rs, rt=rt, o=o, src=h.recv_src_idx)

    graphs = []
    for name, fn in (("bf16", body), ("fp8", fbody)):
        spawn.phase(f"graph warmup {name}")
        s.wait_stream(torch.cuda.current_stream())  # the static inputs were made on the current stream
        args = ()
        if fn is fbody:
            with torch.cuda.stream(s):
                args = (EventOverlap.record(),)
        with torch.cuda.stream(s):
            fn(*args)
        torch.cuda.synchronize()
        group.barrier()
        spawn.phase(f"graph capture {name}")
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            fn(*args)
        torch.cuda.synchronize()
        group.barrier()
        graphs.append(g)
    g, fg = graphs

    def replay(graph, tensors):
        for t in tensors.values():
            _poison_tensor(t)
        torch.cuda.synchronize()
        group.barrier()
        graph.replay()
        torch.cuda.synchronize()
        group.barrier()

    def tir(tks):
        return [reference.get_dispatch_layout(t, E, world).is_token_in_rank for t in tks]

    fails = []
    for it in range(4):
        spawn.phase(f"graph replay {it}")
        rng = np.random.default_rng(1000 + it)
        xs, tks, ws = random_job(rng, world, N, H, E, K, 0.2)
        bs = [np.asarray(rng.standard_normal((N, H)), np.float32).astype(bf16) for _ in range(world)]
        sx.copy_(up(xs[rank].view(np.int16)).view(torch.bfloat16))
        st.copy_(up(tks[rank]))
        sw.copy_(up(ws[rank]))
        sb.copy_(up(bs[rank].view(np.int16)).view(torch.bfloat16))
        replay(g, outs)
        ref = reference.dispatch(xs, E, topk_idx=tks, topk_weights=ws, num_worst_tokens=worst)
        n = ref[rank].handle.num_recv_tokens
        try:
            assert outs["rx"].shape == (worst, H)
            _assert_bits("graph recv_x", _np(outs["rx"])[:n], ref[rank].recv_x[:n])
            _assert_bits("graph recv_topk_idx", _np(outs["rt"]), ref[rank].recv_topk_idx)
            _assert_bits("graph recv_topk_weights", _np(outs["rw"]), ref[rank].recv_topk_weights)
            _assert_bits("graph recv_src_idx", _np(outs["src"]), ref[rank].handle.recv_src_idx)
            _assert_bits("graph handle.rank_prefix", _np(outs["rp"]), ref[rank].handle.rank_prefix)
            _assert_bits("graph handle.send_pos", _np(outs["sp"]), ref[rank].handle.send_pos)
            # the graph's combine input: the received rows times 2 (padding rows: not read)
            ys = [(r.recv_x.astype(np.float32) * 2.0).astype(bf16) for r in ref]
            cref = reference.combine(ys, [r.handle for r in ref], topk_weights=[r.recv_topk_weights for r in ref],
                                     bias=(bs,))[rank]
            _assert_bits("graph combined", _np(outs["o"]), cref[0])
            _assert_bits("graph combined weights", _np(outs["ow"]), cref[1])
            x2s = [(a.astype(np.float32) * np.float32(-0.5)).astype(bf16) for a in xs]
            ref2 = reference.dispatch(x2s, E, is_token_in_rank=tir(tks), num_worst_tokens=worst)[rank]
            _assert_bits("graph cached dispatch recv_x", _np(outs["c2"])[:n], ref2.recv_x[:n])
        except AssertionError as e:
            fails.append(f"replay {it}: {e}")
        if it in (0, 2):
            # FP8 graph: before and after the eager call below
            q = [rng.standard_normal((N, H)).astype(np.float32).clip(-448, 448).astype(ml_dtypes.float8_e4m3fn)
                 for _ in range(world)]
            sc = [rng.random((N, G)).astype(np.float32) + 0.25 for _ in range(world)]
            ftk = [random_topk(rng, N, E, K, drop_prob=0.2) for _ in range(world)]
            fq.copy_(up(q[rank].view(np.uint8)).view(torch.float8_e4m3fn))
            fs.copy_(up(np.ascontiguousarray(sc[rank].T)))
            ft.copy_(up(ftk[rank]))
            replay(fg, fouts)
            fref = reference.dispatch(q, E, topk_idx=ftk, x_scales=sc, num_worst_tokens=worst)
            n = fref[rank].handle.num_recv_tokens
            try:
                _assert_bits("fp8 graph recv_x", _np(fouts["rq"])[:n], fref[rank].recv_x[:n])
                assert fouts["rs"].shape == (worst, G) and fouts["rs"].stride()[0] == 1, "column-major scales out"
                _assert_bits("fp8 graph recv_x_scales", _np(fouts["rs"])[:n], fref[rank].recv_x_scales[:n])
                _assert_bits("fp8 graph recv_topk_idx", _np(fouts["rt"]), fref[rank].recv_topk_idx)
                _assert_bits("fp8 graph recv_src_idx", _np(fouts["src"]), fref[rank].handle.recv_src_idx)
                ys = [(r.recv_x.astype(np.float32) * 2.0).astype(bf16) for r in fref]
                cref = reference.combine(ys, [r.handle for r in fref])[rank]
                _assert_bits("fp8 graph combined", _np(fouts["o"]), cref[0])
            except AssertionError as e:
                fails.append(f"fp8 replay {it}: {e}")
        if it == 1:
            # An eager, CPU-synchronised dispatch and combine with another routing, between replays.
            spawn.phase("graph: eager call between replays")
            exs, etks, ews = random_job(rng, world, N, H, E, K, 0.3)
            rx, rt, rw, cnt, h, _ = buf.dispatch(up(exs[rank].view(np.int16)).view(torch.bfloat16),
                                                 topk_idx=up(etks[rank]), topk_weights=up(ews[rank]), num_experts=E)
            eref = reference.dispatch(exs, E, topk_idx=etks, topk_weights=ews)
            ys = [(r.recv_x.astype(np.float32) * 3.0).astype(bf16) for r in eref]
            o, ow, _ = buf.combine(up(ys[rank].view(np.int16)).view(torch.bfloat16), h, topk_weights=rw)
            cref = reference.combine(ys, [r.handle for r in eref],
                                     topk_weights=[r.recv_topk_weights for r in eref])[rank]
            try:
                _assert_bits("eager recv_x", _np(rx), eref[rank].recv_x)
                _assert_bits("eager recv_topk_idx", _np(rt), eref[rank].recv_topk_idx)
                _assert_bits("eager recv_topk_weights", _np(rw), eref[rank].recv_topk_weights)
                assert cnt == eref[rank].num_recv_tokens_per_expert_list, f"eager counts {cnt}"
                _assert_bits("eager combined", _np(o), cref[0])
                _assert_bits("eager combined weights", _np(ow), cref[1])
            except AssertionError as e:
                fails.append(f"eager call after replay 1: {e}")
            torch.cuda.synchronize()
            group.barrier()
    # Tensors that async_finish recorded on the comm streams outlive the Buffer: torch records an
    # event on those streams when it frees them, which must not fail (it would abort the process
    # from a destructor).  Then the graphs' tensors go too.
    spawn.phase("free tensors after destroy")
    kept = buf.get_dispatch_layout(st, E, async_finish=True)
    kept[4].current_stream_wait()
    buf.destroy()
    del kept, g, fg, graphs
    outs.clear()
    fouts.clear()
    gc.collect()
    torch.cuda.synchronize()
    return fails


@needs_ranks
def test_graph_captured_dispatch_combine_replays_with_new_routing():
    res = spawn.run(_graph_worker, _world(), timeout=240)
    for rank, fails in enumerate(res):
        assert not fails, f"rank {rank}: {fails}"


# ---- failure behaviour ----
def _timeout_worker(rank, world, group):
    import time

    import torch

    import epcomm
    from epcomm.errors import BufferStateError, EpcommTimeoutError
    torch.cuda.set_device(device_of(rank))
    N, H, E = 64, 2048, 64
    buf = epcomm.Buffer(group, epcomm.Buffer.get_nvl_buffer_size_hint(H, world, N, 8))
    x = torch.randn(N, H, device="cuda").to(torch.bfloat16)
    topk = torch.randint(0, E, (N, 8), device="cuda")
    out = {}
    # Buffer too small: every rank raises before launching, with the size needed.
    try:
        buf.dispatch(torch.randn(N * 64, H, device="cuda").to(torch.bfloat16), topk_idx=torch.randint(0, E, (N * 64, 8), device="cuda"), num_experts=E)
        out["too_small"] = "no error"
    except ValueError as e:
        out["too_small"] = "ok" if "need num_nvl_bytes >=" in str(e) else f"wrong message: {e}"
    group.barrier()
    if rank == 0:
        t0 = time.monotonic()
        try:
            buf.dispatch(x, topk_idx=topk, num_experts=E)
            out["timeout"] = "no error"
        except EpcommTimeoutError as e:
            dt = time.monotonic() - t0
            msg = str(e)
            ok = "rank 0" in msg and ("notify" in msg or "counts" in msg) and dt < 30
            out["timeout"] = "ok" if ok else f"bad: {dt:.1f}s {msg}"
        try:
            buf.dispatch(x, topk_idx=topk, num_experts=E)
            out["poisoned"] = "no error"
        except BufferStateError:
            out["poisoned"] = "ok"
    else:
        time.sleep(12)  # never calls dispatch: rank 0 must give up, naming where
    group.barrier()
    torch.cuda.synchronize()
    return out


@needs_ranks
def test_missing_peer_times_out_with_rank_and_phase_and_too_small_buffer_raises():
    res = spawn.run(_timeout_worker, _world(), timeout=180, env={"EPCOMM_TIMEOUT_S": "4"})
    for rank, r in enumerate(res):
        for k, v in r.items():
            assert v == "ok", f"rank {rank} {k}: {v}"
    assert "timeout" in res[0] and "poisoned" in res[0]


def _mismatch_worker(rank, world, group):
    import time

    import torch

    import epcomm
    from epcomm.errors import BufferStateError, RankMismatchError
    torch.cuda.set_device(device_of(rank))
    torch.manual_seed(rank)
    N, E = 256, 64
    size = epcomm.Buffer.get_nvl_buffer_size_hint(4096, world, N, 8)
    last = world - 1  # the rank that calls with a different shape
    # (what differs, kwargs of every rank, kwargs of the last rank, CPU-synchronised?)
    cases = [
        ("num_topk", dict(H=2048, K=8), dict(H=2048, K=4), True),
        ("hidden", dict(H=2048, K=8), dict(H=4096, K=8), True),
        ("chunk_rows", dict(H=2048, K=8, chunk=64), dict(H=2048, K=8, chunk=32), False),
    ]
    out = {}
    for field, kw, kw_last, sync in cases:
        a = kw_last if rank == last else kw
        H, K = a["H"], a["K"]
        cfg = epcomm.Config(num_sms=8, chunk_rows=a.get("chunk", 64))
        buf = epcomm.Buffer(group, size)
        x = torch.randn(N, H, device="cuda").to(torch.bfloat16)
        topk = torch.randint(0, E, (N, K), device="cuda")
        t0 = time.monotonic()
        try:
            buf.dispatch(x, topk_idx=topk, num_experts=E, config=cfg,
                         num_worst_tokens=0 if sync else N * world)
            buf.synchronize()  # the num_worst_tokens path reports device errors here
            out[field] = "no error"
        except RankMismatchError as e:
            dt = time.monotonic() - t0
            ok = e.field == field and e.rank == rank and dt < 20 and (rank == last or e.peer == last)
            out[field] = "ok" if ok else f"bad: {dt:.1f}s field={e.field} rank={e.rank} peer={e.peer}: {e}"
        except Exception as e:  # noqa: BLE001 - reported per rank below
            out[field] = f"{type(e).__name__}: {e}"
        try:
            buf.dispatch(x, topk_idx=topk, num_experts=E, config=cfg)
            out[field + "_poisoned"] = "no error"
        except BufferStateError:
            out[field + "_poisoned"] = "ok"
        buf.destroy()
        group.barrier()
    # A fresh Buffer with matching shapes works after all that.
    buf = epcomm.Buffer(group, size)
    x = torch.randn(N, 2048, device="cuda").to(torch.bfloat16)
    topk = torch.randint(0, E, (N, 8), device="cuda")
    rx, *_ = buf.dispatch(x, topk_idx=topk, num_experts=E)
    torch.cuda.synchronize()
    out["fresh_buffer"] = "ok" if rx.shape[1] == 2048 else f"bad shape {tuple(rx.shape)}"
    buf.destroy()
    group.barrier()
    return out


@needs_ranks
def test_ranks_calling_dispatch_with_different_shapes_all_raise_naming_the_field():
    # EPCOMM_TIMEOUT_S large: the error must come from the shape check, not from a timeout.
    res = spawn.run(_mismatch_worker, _world(), timeout=240, env={"EPCOMM_TIMEOUT_S": "60"})
    assert_every_rank_ok(res)
    assert len(res[0]) == 7


def _bad_index_worker(rank, world, group):
    import torch

    from epcomm import reference

    import epcomm
    torch.cuda.set_device(device_of(rank))
    N, H, E, K = 128, 2048, 64, 8
    xs, tks, ws = random_job(np.random.default_rng(11), world, N, H, E, K, 0.1)
    up = lambda a: torch.from_numpy(np.ascontiguousarray(a)).cuda()  # noqa: E731
    x = up(xs[rank].view(np.int16)).view(torch.bfloat16)
    bt = int(np.nonzero(tks[0][:, 2] >= 0)[0][0])  # a token whose third choice is an expert
    bad = tks[rank].copy()
    if rank == 0:
        bad[bt, 2] = E  # out of range, seen only on the device (EPCOMM_CHECK_INDICES=0)
    buf = epcomm.Buffer(group, epcomm.Buffer.get_nvl_buffer_size_hint(H, world, N, K))
    out = {}
    # The kernels skip the index as if it were -1, and every rank completes the call.
    skipped = [t.copy() for t in tks]
    skipped[0][bt, 2] = -1
    for name, topk, ref_topk in (("with_bad_index", bad, skipped), ("next_call", tks[rank], tks)):
        rx, rt, rw, _, _, _ = buf.dispatch(x, topk_idx=up(topk), topk_weights=up(ws[rank]), num_experts=E)
        torch.cuda.synchronize()
        ref = reference.dispatch(xs, E, topk_idx=ref_topk, topk_weights=ws)[rank]
        try:
            _assert_bits(f"{name} recv_x", rx.view(torch.int16).cpu().numpy(), ref.recv_x.view(np.int16))
            _assert_bits(f"{name} recv_topk_idx", rt.cpu().numpy(), ref.recv_topk_idx)
            out[name] = "ok"
        except AssertionError as e:
            out[name] = str(e)
        if name == "with_bad_index":
            try:
                buf.check()
                out["reported"] = "no error" if rank == 0 else "ok"
            except ValueError as e:
                out["reported"] = "ok" if rank == 0 and f"expert index 64 (token {bt})" in str(e) else f"{e}"
    # A layout computed elsewhere (as if the index were -1): the dispatch kernels themselves
    # skip and record it, here a negative index other than -1.
    spawn.phase("dispatch with a precomputed layout")
    neg = tks[rank].copy()
    if rank == 0:
        neg[bt, 2] = -5
    lay = reference.get_dispatch_layout(skipped[rank], E, world)
    rx, rt, _, _, _, _ = buf.dispatch(x, num_tokens_per_rank=up(lay.num_tokens_per_rank),
                                      is_token_in_rank=up(lay.is_token_in_rank),
                                      num_tokens_per_expert=up(lay.num_tokens_per_expert), topk_idx=up(neg),
                                      topk_weights=up(ws[rank]))
    torch.cuda.synchronize()
    ref = reference.dispatch(xs, E, topk_idx=skipped, topk_weights=ws)[rank]
    try:
        _assert_bits("precomputed layout recv_x", rx.view(torch.int16).cpu().numpy(), ref.recv_x.view(np.int16))
        _assert_bits("precomputed layout recv_topk_idx", rt.cpu().numpy(), ref.recv_topk_idx)
        out["precomputed_layout"] = "ok"
    except AssertionError as e:
        out["precomputed_layout"] = str(e)
    try:
        buf.check()
        out["reported_by_dispatch"] = "no error" if rank == 0 else "ok"
    except ValueError as e:
        msg = str(e)
        out["reported_by_dispatch"] = ("ok" if rank == 0 and msg.startswith("dispatch") and
                                       f"expert index -5 (token {bt})" in msg else msg)
    buf.destroy()
    return out


@needs_ranks
def test_bad_expert_index_seen_on_the_device_is_reported_and_the_call_completes_everywhere():
    res = spawn.run(_bad_index_worker, _world(), timeout=120, env={"EPCOMM_CHECK_INDICES": "0", "EPCOMM_TIMEOUT_S": "20"})
    assert_every_rank_ok(res)
