"""Low-latency dispatch/combine on every visible GPU, against epcomm.reference.

One process per GPU, all cases in one spawn; every rank derives all ranks' inputs from the
case seed and checks its own outputs bit for bit: packed rows (FP8 bytes and scales included),
counts, source indices, ranges and combined values.  Each case runs three rounds with new data,
so both buffer slots are used and reused.  What makes the checks bite:

* poison: before each dispatch the slot it will overwrite (the dispatch two calls back, no
  longer needed) has its packed outputs filled with bytes no output can hold (0x7F: counts and
  indices 2139062143, e4m3 NaN, bf16/f32 3.4e38; scales 0xFF: NaN, a NaN UE8M0 exponent), and
  ``out=`` tensors are filled with bf16 0x7F7F; so a row, count or range a kernel forgets to
  write fails, however the rounds before left the memory;
* the combine's input rows past ``recv_count`` are bf16 NaN (the reference never reads them):
  a combine that reads one fails;
* receive hooks: the device is synchronised and the ranks barrier between the send call and
  ``hook()``, so the send half must complete with no receive kernel running on any rank;
* ``previous_event``: the input is written by a side stream after a ~0.1 s sleep and only the
  event orders it, so a call that does not wait for the event reads poison; right after the
  call nothing may have finished (the async event, or the caller's stream, is still pending).
  These calls run with EPCOMM_CHECK_INDICES=0 (the host check would wait for the event first);
* ``clean_low_latency_buffer`` runs halfway through each spawn: a handle from before it must
  raise BufferStateError, and the cases after it prove the buffer works on.

Coverage: the dispatch kernels (bf16 and FP8 at hidden 2048/4096/7168) in both the one-kernel
and the send/receive (hook) form, T in {1, 128, 256}, top-k 1/8/16, 32 to 288 experts, a rank
with no tokens, stats (also with the hook), async, zero_copy (also with the hook), out=,
previous_event (sync and async); the same cases with every peer through NVSHMEM puts (a
subset), with one combine row per (token, expert), and on the steady-state fast paths; two
micro-batches in flight with hooks and CUDA graphs (bf16, then FP8 with UE8M0 scales) replayed
with new routing and eager calls in between, in the NVLink and the put spawns; two T
alternating between the slots (no header another shape left in the other slot is received).

DeepEP numerics and the DeepEP features: a spawn with ``Buffer(numerics="deepep")`` (FP8 scales
``amax * float32(1/448)``, the combine's FMA sum) on the full and the fast paths; LogFMT-10
combines (``use_logfmt``; expert outputs scaled so that most 128-channel groups are cast and
some are not, hidden 2560 for a partial last 1024-channel step) over NVLink, through NVSHMEM
puts and with FMA; all checked bit for bit against the extended reference.  The wait
statistics: int64 per rank, never negative, growing with every call, and (two or more ranks,
one-kernel calls) at least the delay the last rank puts before its sends into rank 0's entry
for it.

Marked gpu/multigpu.  With one GPU the tests run with one rank, or with 2 sharing it under
EPCOMM_SHARE_GPU=1 (correctness only); EPCOMM_TEST_RANKS picks another number of ranks.  The
test ids end in ``-R<ranks>``: with one rank no peer path runs (every message is a local
store, or an NVSHMEM put to itself), so an ``-R1`` pass says nothing about peers.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from epcomm.tools import spawn
from gpu_checks import (TEST_TIMEOUT, env_var, assert_bits as _assert_bits, assert_every_rank_ok, device_of,
                        ll_ranks as _world, needs_ll_ranks, needs_two_ll_ranks, run_once, to_np as _np)

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]

# Test ids carry the world size: a one-rank run (the default on one GPU) exercises no peer.
_R = f"-R{_world()}" if _world() else ""


def _case(name, **kw):
    base = dict(name=name, T=128, N=None, H=7168, E=64, K=8, fp8=True, round_scale=False, ue8m0=False,
                hook=False, async_=False, zero_copy=False, out=False, stats=False, drop=0.1,
                empty_rank0=False, prev_event=False, logfmt=False, wait_stats=False)
    base.update(kw)
    assert not (base["prev_event"] and (base["hook"] or base["zero_copy"])), name
    assert not (base["logfmt"] and base["zero_copy"]), name  # refused by the API
    return base


CASES = [
    _case("fp8_t128_h7168_e256_k8", E=256),
    _case("fp8_t128_h7168_e288_k8_hook_stats", E=288, hook=True, stats=True),
    _case("bf16_t128_h4096_e64_k8", H=4096, fp8=False),
    _case("fp8_round_scale_t256_h2048", T=256, H=2048, round_scale=True),
    _case("fp8_ue8m0_t256_h7168", T=256, round_scale=True, ue8m0=True, E=128),
    _case("fp8_t1_k1", T=1, K=1, E=32),
    _case("fp8_t1_k16_e32", T=1, K=16, E=32),
    _case("bf16_k16_e32_hook_zero_copy", K=16, E=32, fp8=False, hook=True, zero_copy=True),
    _case("fp8_h4096_async_previous_event", H=4096, E=64, async_=True, prev_event=True),
    _case("fp8_partial_batch_n50_t128_stats_previous_event", N=50, E=64, stats=True, prev_event=True),
    _case("fp8_zero_copy_out", E=64, zero_copy=True, out=True),
    _case("fp8_k1_out", E=64, K=1, out=True),
    _case("fp8_h4096_heavy_drop_hook_rank0_empty", H=4096, E=64, drop=0.6, hook=True, empty_rank0=True, out=True),
    _case("bf16_t256_h2048_e288_k16", T=256, H=2048, E=288, K=16, fp8=False),
    _case("bf16_t1_h7168_e288_k8_async", T=1, E=288, fp8=False, async_=True),  # async without previous_event
    _case("fp8_t128_h2048_hook", H=2048, hook=True),
    # LogFMT-10 combines (the expert outputs are scaled so most groups are cast: see _round).
    _case("logfmt_bf16_t128_h7168_e64_k8", fp8=False, logfmt=True),
    _case("logfmt_fp8_h2560_hook_out", H=2560, logfmt=True, hook=True, out=True),
    _case("logfmt_t1_k16_e32_async", T=1, K=16, E=32, logfmt=True, async_=True),
    # Wait statistics (the last rank delays its sends: see _round).
    _case("wait_stats_fp8_t64_h2048", T=64, H=2048, wait_stats=True),
    _case("wait_stats_logfmt_hook_h4096", H=4096, hook=True, wait_stats=True, logfmt=True),
]

# Pseudo-case run last in the NVLink and put spawns (see _overlap).
OVERLAP = dict(name="overlap", T=64, H=2048, E=64, K=8)


def _up(a):
    import ml_dtypes
    import torch
    a = np.ascontiguousarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).cuda().view(torch.bfloat16)
    return torch.from_numpy(a).cuda()


def _poison_slot(ll, slot):
    """Fill the packed dispatch outputs of one buffer slot with bytes no output holds: 0x7F
    (counts, indices and ranges 2139062143, e4m3 NaN, bf16 3.4e38), scales 0xFF (float32 NaN,
    UE8M0 exponent 0xFF = NaN; a 0x7F UE8M0 byte would be the valid scale 1.0).  Only on the
    caller's stream, which every later kernel of the slot follows (the previous_event test
    orders its side stream after it too).  Safe: the fast-path plans keep pointing at the same
    tensors, and tok_rows/tok_meta/src_k (the combine's records, not outputs) stay untouched."""
    _poison_results(ll._results[slot])


def _poison_results(res):
    """_poison_slot's fill, of one results object (e.g. a captured graph's)."""
    import torch
    if res is None or res.key[0] != "torch":
        return
    for a, byte in ((res.x, 0x7F), (res.scales, 0xFF), (res.count, 0x7F), (res.src_info, 0x7F),
                    (res.layout_range, 0x7F)):
        if a is not None:
            a[0].view(torch.uint8).fill_(byte)


def _late(t):
    """``(late, event)``: a copy of ``t`` that a side stream writes after a ~0.1 s sleep, and the
    EventOverlap of that write.  The current stream never waits for it, so only a call that waits
    for ``previous_event`` reads ``t``; one that does not reads the 0x7F poison (the side stream
    starts after everything queued so far, poison included)."""
    import torch

    from epcomm.runtime.driver import event_create, event_record
    from epcomm.runtime.event import EventOverlap
    late = torch.empty_like(t)
    late.view(torch.uint8).fill_(0x7F)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s at H200 clocks
        late.copy_(t)
    late.record_stream(side)
    e = event_create()
    event_record(e, side.cuda_stream)
    return late, EventOverlap(e, "torch", torch.cuda.current_device())


def _host_index_check_off(on=True):
    """EPCOMM_CHECK_INDICES=0 around one previous_event call (``on``): with the check on, the
    host reads the indices, first waiting for previous_event (the indices may be written on the
    stream it orders), so by the launch the input is ready and the ordering test says nothing."""
    return env_var("EPCOMM_CHECK_INDICES", "0" if on else None)


def _assert_pending(what, ev, async_):
    """Right after a call ordered after a _late event nothing of it can have finished: the async
    call's event, or (synchronous call) the caller's stream, which must wait for the kernel."""
    import torch
    if async_:
        done = ev.query()
    else:
        probe = torch.cuda.Event()
        probe.record()
        done = probe.query()
    assert not done, (f"{what} with previous_event: finished while the event it must wait for was still pending "
                      f"(the call blocked, or did not wait for the event)")


# In a wait-statistics case (one-kernel calls, two or more ranks) every rank starts a call
# together, and the last rank's kernel only after a GPU sleep of this many cycles (about 1 ms):
# rank 0's receive then waits at least a fifth of that for the last rank.
DELAY_CYCLES = 2_000_000
DELAY_NS_AT_LEAST = 200_000


class SyncMismatch(RuntimeError):
    """Ranks of the spawn reached different sync points (one left a case's rounds early)."""


def _sync(group, point, note=""):
    """torch.cuda.synchronize() and a barrier that names where each rank is.  The group only
    counts its rounds, so a rank that left a case's rounds after a failed check (skipping their
    hook barriers) would otherwise pair its next barriers with other points of its peers: it
    runs the next cases against their rounds, and the spawn hangs later with the first failure
    hidden in the unreturned results.  Ranks at different points raise SyncMismatch here,
    naming every rank's point and ``note``.  Returns every rank's note."""
    import torch
    torch.cuda.synchronize()
    got = [b.decode(errors="replace").split("\0", 1) for b in group.allgather_bytes(f"{point}\0{note}".encode())]
    if any(p != point for p, _ in got):
        raise SyncMismatch("ranks at different sync points: "
                           + "; ".join(f"rank {r}: {p!r} ({n[:300]})" for r, (p, n) in enumerate(got)))
    return [n for _, n in got]


def _delay_last_rank(rank, world, group, case, point):
    import torch
    if not case["wait_stats"] or case["hook"] or world < 2:
        return
    _sync(group, point)
    if rank == world - 1:
        torch.cuda._sleep(DELAY_CYCLES)


def _round(rank, world, group, buf, case, it, stats, wstats=(None, None)):
    import ml_dtypes
    import torch

    from epcomm import reference
    from epcomm.testing import random_bf16, random_topk, random_weights
    T, H, E, K = case["T"], case["H"], case["E"], case["K"]
    numerics = buf.numerics
    L = E // world
    rng = np.random.default_rng((zlib.crc32(case["name"].encode()) + 7919 * it) % 2**32)
    xs, tks, ws = [], [], []
    for r in range(world):
        n = case["N"] if case["N"] is not None else T
        if case["empty_rank0"] and r == 0:
            n = 0
        tk = random_topk(rng, n, E, K, drop_prob=case["drop"])
        tks.append(tk)
        ws.append(random_weights(rng, tk))
        xs.append(random_bf16(rng, (n, H)))
    ref = reference.low_latency_dispatch(xs, tks, T, E, use_fp8=case["fp8"], round_scale=case["round_scale"],
                                         use_ue8m0=case["ue8m0"], numerics=numerics)
    x, topk, w = _up(xs[rank]), _up(tks[rank]), _up(ws[rank])
    # The slot this dispatch overwrites holds the dispatch of two calls back, checked already.
    _poison_slot(buf._ll, buf._ll._disp_slot)
    kw = {}
    if case["prev_event"]:
        x, kw["previous_event"] = _late(x)
    if wstats[0] is not None:
        kw["dispatch_wait_recv_cost_stats"] = wstats[0]
    _delay_last_rank(rank, world, group, case, f"{case['name']} round {it}: before the dispatch")
    with _host_index_check_off(case["prev_event"]):
        recv, cnt, handle, ev, hook = buf.low_latency_dispatch(
            x, topk, T, E, use_fp8=case["fp8"], round_scale=case["round_scale"], use_ue8m0=case["ue8m0"],
            async_finish=case["async_"], return_recv_hook=case["hook"], cumulative_local_expert_recv_stats=stats,
            **kw)
    if case["prev_event"] and it > 0:  # (round 0 may load the kernel module, eating into the sleep)
        _assert_pending("low_latency_dispatch", ev, case["async_"])
    if case["hook"]:
        # The send half completes on every rank with no receive kernel running anywhere
        # ("nothing occupies the GPU in between"); a send waiting for a receive times out here.
        _sync(group, f"{case['name']} round {it}: dispatch receive hook")
        hook()
    if case["async_"]:
        ev.current_stream_wait()
    rr = ref[rank]
    got_cnt = _np(cnt)
    _assert_bits("recv_count", got_cnt, rr.recv_count)
    _assert_bits("layout_range", _np(handle.layout_range), rr.handle.layout_range)
    src = _np(handle.src_info)
    gx = _np(recv[0] if case["fp8"] else recv)
    gs = _np(recv[1]) if case["fp8"] else None
    for j in range(L):
        c = int(rr.recv_count[j])
        _assert_bits(f"src_info[{j}]", src[j, :c], rr.handle.src_info[j, :c])
        _assert_bits(f"recv_x[{j}]", gx[j, :c], rr.recv_x[j, :c])
        if case["fp8"]:
            _assert_bits(f"recv_x_scales[{j}]", gs[j, :c], rr.recv_x_scales[j, :c])
    # Expert outputs: y_d[j] = bf16(float32(expert input) * (d + 1.5) * (1 + j / 64)): every
    # expert's row differs, so the order of a combine's additions shows.  Rows past the count
    # are NaN: the reference never reads them, a combine that does fails.
    ys = []
    fac = (1 + np.arange(L, dtype=np.float32) / 64)[:, None, None]
    for d in range(world):
        r = ref[d]
        base = r.recv_x.astype(np.float32)
        if case["fp8"]:
            sc = r.recv_x_scales
            if case["ue8m0"]:
                sc = reference.unpack_ue8m0(sc, H // 128)
            base = base * np.repeat(sc.astype(np.float32), 128, axis=-1)
        y_d = base * np.float32(d + 1.5) * fac
        if case["logfmt"]:
            # LogFMT casts a 128-channel group only if its magnitudes stay below 1: scale most
            # groups down (values around 0.1, some zeros from FP8 underflow), and leave every
            # third group of every fourth local expert as is (mostly at or above 1: sent as
            # bf16), so those rows mix cast and bf16 groups (packed at shifted offsets).
            keep = np.zeros(H // 128, dtype=bool)
            keep[::3] = True
            sc = np.full((L, 1, H // 128), np.float32(1 / 32))
            sc[::4, 0, :] = np.where(keep, np.float32(1), np.float32(1 / 32))
            y_d = y_d * np.repeat(sc, 128, axis=-1)
        y_d = y_d.astype(ml_dtypes.bfloat16)
        for j in range(L):
            y_d[j, int(r.recv_count[j]):] = np.nan
        ys.append(y_d)
    partials = _partial_pairs(buf, rank, world) & (not case["logfmt"])
    cref = reference.low_latency_combine(ys, tks, ws, [r.handle for r in ref], partials=partials, numerics=numerics,
                                         use_logfmt=case["logfmt"])[rank]
    if case["zero_copy"]:
        y = buf.get_next_low_latency_combine_buffer(handle)
        y.copy_(_up(ys[rank]))
    else:
        y = _up(ys[rank])
    if case["out"]:
        out = torch.empty(xs[rank].shape, dtype=torch.bfloat16, device="cuda")
        out.view(torch.int16).fill_(0x7F7F)
    else:
        out = None
        # Best effort: the combine's own output most likely reuses this freed, poisoned block.
        torch.empty(xs[rank].shape, dtype=torch.bfloat16, device="cuda").view(torch.int16).fill_(0x7F7F)
    kw = {}
    if case["prev_event"]:
        y, kw["previous_event"] = _late(y)
    if case["logfmt"]:
        kw["use_logfmt"] = True
    if wstats[1] is not None:
        kw["combine_wait_recv_cost_stats"] = wstats[1]
    _delay_last_rank(rank, world, group, case, f"{case['name']} round {it}: before the combine")
    with _host_index_check_off(case["prev_event"]):
        comb, ev2, hook2 = buf.low_latency_combine(y, topk, w, handle, zero_copy=case["zero_copy"], out=out,
                                                   async_finish=case["async_"], return_recv_hook=case["hook"], **kw)
    if case["prev_event"] and it > 0:
        _assert_pending("low_latency_combine", ev2, case["async_"])
    if case["hook"]:
        _sync(group, f"{case['name']} round {it}: combine receive hook")
        hook2()
    if case["async_"]:
        ev2.current_stream_wait()
    if out is not None:
        assert comb.data_ptr() == out.data_ptr(), "out= was not used"
    _assert_bits("combined", _np(comb), cref)
    return rr.recv_count, (handle, y, topk, w)


def _partial_pairs(buf, rank, world):
    """bool [R, R]: the (source, expert-side rank) pairs whose low-latency combine sends
    partials, as the kernels decide (ll_partial): the Buffer's setting, between ranks that reach
    each other over NVLink, so not across nodes (declared ones included).  Row ``rank`` must
    match this rank's peer table (0: puts), or the expectation would model another transport."""
    ll = buf._ll
    pairs = ll.partial_pairs()
    mine = np.array([bool(ll.partials and not ll.force_put) and ptr != 0 for ptr in ll.peers])
    assert np.array_equal(pairs[rank], mine), f"partials expected with ranks {pairs[rank]}, peer table gives {mine}"
    return pairs


def _hint(c, world):
    import epcomm
    return epcomm.Buffer.get_low_latency_rdma_size_hint(c["T"], c["H"], world, c["E"])


def _check_clean(buf, shape, stale):
    """clean_low_latency_buffer with the spawn's largest shape; the last handle from before it
    must then raise BufferStateError (its records were erased) in the combine and in
    get_next_low_latency_combine_buffer, without launching anything."""
    from epcomm.errors import BufferStateError
    buf.clean_low_latency_buffer(*shape)
    if stale is None:
        return "FAIL: no handle from the case before (it failed)"
    handle, y, topk, w = stale
    for what, call in (("low_latency_combine", lambda: buf.low_latency_combine(y, topk, w, handle)),
                       ("get_next_low_latency_combine_buffer",
                        lambda: buf.get_next_low_latency_combine_buffer(handle))):
        try:
            call()
            return f"FAIL: {what} with a handle from before clean_low_latency_buffer did not raise"
        except BufferStateError as e:
            if "clean_low_latency_buffer" not in str(e):
                return f"FAIL: {what}: {e}"
    return "ok"


def _check_wait_stats(rank, world, case, snaps):
    """The wait statistics after each round (dispatch, combine): int64, never negative, never
    shrinking; with two or more ranks and one-kernel calls, rank 0's entry for the last rank
    holds at least the delay of each round (_delay_last_rank)."""
    for name, i in (("dispatch_wait_recv_cost_stats", 0), ("combine_wait_recv_cost_stats", 1)):
        seq = [s[i] for s in snaps]
        assert all(v.dtype == np.int64 and v.shape == (world,) for v in seq), name
        assert seq[0].min() >= 0, f"{name}: negative after round 1: {seq[0]}"
        for a, b in zip(seq, seq[1:]):
            assert np.all(b >= a), f"{name}: shrank from {a} to {b}"
        if world > 1 and not case["hook"] and rank == 0:
            want = DELAY_NS_AT_LEAST * len(seq)
            assert seq[-1][world - 1] >= want, (f"{name}: rank 0 waited {seq[-1][world - 1]} ns for the last rank "
                                                f"over {len(seq)} rounds, each delayed ~1 ms; expected >= {want}")


def _worker(rank, world, group, cases, rounds=3, numerics="epcomm"):
    import torch

    import epcomm
    torch.cuda.set_device(device_of(rank))
    real = [c for c in cases if c["name"] != "overlap"]
    # clean_low_latency_buffer halfway, with the largest shape (the one that sizes the heap).
    big = max(real, key=lambda c: _hint(c, world))
    clean_after = real[max(len(real) // 2 - 1, 0)]["name"]
    need = max(_hint(c, world) for c in cases)
    buf = epcomm.Buffer(group, 0, need, low_latency_mode=True, numerics=numerics)
    results = {}
    for case in cases:
        spawn.phase(case["name"])
        stale = None
        try:
            if case["name"] == "overlap":
                fails = _overlap(rank, world, group, buf)
                results["overlap"] = "ok" if not fails else "FAIL: " + "; ".join(fails)
            else:
                stats = (torch.zeros(case["E"] // world, dtype=torch.int32, device="cuda") if case["stats"]
                         else None)
                wstats = ((torch.zeros(world, dtype=torch.int64, device="cuda"),
                           torch.zeros(world, dtype=torch.int64, device="cuda")) if case["wait_stats"]
                          else (None, None))
                snaps = []
                total = 0
                fast0 = buf._ll.fast_calls
                for it in range(rounds):
                    cnt, stale = _round(rank, world, group, buf, case, it, stats, wstats)
                    total = total + cnt
                    if case["wait_stats"]:
                        snaps.append(tuple(_np(t).copy() for t in wstats))
                results["fast_calls:" + case["name"]] = buf._ll.fast_calls - fast0
                if stats is not None:
                    _assert_bits("cumulative stats", stats.cpu().numpy(), total.astype(np.int32))
                if snaps:
                    _check_wait_stats(rank, world, case, snaps)
                results[case["name"]] = "ok"
        except AssertionError as e:
            results[case["name"]] = f"FAIL: {e}"
        except Exception as e:
            import traceback
            results[case["name"]] = f"ERROR: {type(e).__name__}: {e}\n{traceback.format_exc()}"
        # Every rank leaves when any rank errored (its peers would wait for it in the next case).
        notes = _sync(group, f"end of {case['name']}", results[case["name"]])
        if any(n.startswith("ERROR") for n in notes):
            break
        if case["name"] == clean_after:
            spawn.phase("clean_low_latency_buffer")
            try:
                results["clean_low_latency_buffer"] = _check_clean(buf, (big["T"], big["H"], big["E"]), stale)
            except Exception as e:
                import traceback
                results["clean_low_latency_buffer"] = f"ERROR: {type(e).__name__}: {e}\n{traceback.format_exc()}"
            _sync(group, "after clean_low_latency_buffer")
    buf.destroy()
    return results


def _overlap(rank, world, group, buf):
    """Two micro-batches in flight with hooks (twice: fresh slots, then both poisoned), then a
    bf16 CUDA graph replayed 4 times with new routing and two eager dispatch+combine rounds
    between replays 1 and 2 (one in each slot: the graph's results are reused and its tags
    move on), then an FP8 graph (round_scale + UE8M0) replayed in turn with the bf16 one (whose
    results another dtype's dispatches must not free), then a graph whose dispatch's
    previous_event was recorded before the capture.  Every dispatch output (counts, ranges,
    source indices, rows, scales) and every combine is compared.  Returns the failures."""
    import ml_dtypes
    import torch

    from epcomm import reference
    from epcomm.runtime.event import EventOverlap
    from epcomm.testing import random_bf16, random_topk, random_weights
    T, H, E, K = OVERLAP["T"], OVERLAP["H"], OVERLAP["E"], OVERLAP["K"]
    L = E // world
    ll = buf._ll
    partials = _partial_pairs(buf, rank, world)
    fp8kw = dict(use_fp8=True, round_scale=True, use_ue8m0=True)
    fails = []

    def data(seed):
        rng = np.random.default_rng(seed)
        xs, tks, ws = [], [], []
        for r in range(world):
            tk = random_topk(rng, T, E, K, drop_prob=0.1)
            tks.append(tk); ws.append(random_weights(rng, tk)); xs.append(random_bf16(rng, (T, H)))
        return xs, tks, ws

    def expected(xs, tks, ws, fp8=False):
        ref = reference.low_latency_dispatch(xs, tks, T, E, **(fp8kw if fp8 else dict(use_fp8=False)))
        ys = [(r.recv_x.astype(np.float32) * 3.0).astype(ml_dtypes.bfloat16) for r in ref]
        return ref[rank], reference.low_latency_combine(ys, tks, ws, [r.handle for r in ref], partials=partials)[rank]

    def expert(rx, cnt):
        """bf16(float32(row) * 3) on rows below the count, NaN past it (graph-capturable)."""
        x = rx[0] if isinstance(rx, tuple) else rx
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < cnt[:, None]
        return torch.where(valid[:, :, None], x.float() * 3.0, float("nan")).to(torch.bfloat16)

    def check(what, inputs, rx, cnt, h, comb, fp8=False):
        rr, cref = expected(*inputs, fp8=fp8)
        try:
            _assert_bits(f"{what} recv_count", _np(cnt), rr.recv_count)
            _assert_bits(f"{what} layout_range", _np(h.layout_range), rr.handle.layout_range)
            src = _np(h.src_info)
            gx = _np(rx[0] if fp8 else rx)
            gs = _np(rx[1]) if fp8 else None
            for j in range(L):
                c = int(rr.recv_count[j])
                _assert_bits(f"{what} src_info[{j}]", src[j, :c], rr.handle.src_info[j, :c])
                _assert_bits(f"{what} recv_x[{j}]", gx[j, :c], rr.recv_x[j, :c])
                if fp8:
                    _assert_bits(f"{what} recv_x_scales[{j}]", gs[j, :c], rr.recv_x_scales[j, :c])
            _assert_bits(f"{what} combined", _np(comb), cref)
        except AssertionError as e:
            fails.append(str(e))

    for rep in range(2):
        spawn.phase(f"two micro-batches ({rep})")
        if rep:
            _poison_slot(ll, 0)
            _poison_slot(ll, 1)
        mbs = [data(11 + 2 * rep), data(12 + 2 * rep)]
        dev = [(_up(xs[rank]), _up(tks[rank]), _up(ws[rank])) for xs, tks, ws in mbs]
        d = [buf.low_latency_dispatch(x, t, T, E, use_fp8=False, return_recv_hook=True) for x, t, _ in dev]
        # Both micro-batches' send halves complete on every rank before any receive starts.
        torch.cuda.synchronize()
        group.barrier()
        d[0][4]()
        d[1][4]()
        ys = [expert(dd[0], dd[1]) for dd in d]
        c = [buf.low_latency_combine(ys[i], dev[i][1], dev[i][2], d[i][2], return_recv_hook=True) for i in range(2)]
        torch.cuda.synchronize()
        group.barrier()
        c[1][2]()
        c[0][2]()
        torch.cuda.synchronize()
        for i in range(2):
            check(f"micro-batch {i} ({rep})", mbs[i], d[i][0], d[i][1], d[i][2], c[i][0])
        group.barrier()

    sx = torch.zeros(T, H, dtype=torch.bfloat16, device="cuda")
    st = torch.full((T, K), -1, dtype=torch.int64, device="cuda")
    sw = torch.zeros(T, K, dtype=torch.float32, device="cuda")
    s = torch.cuda.Stream()
    holder = {}

    def body(kw, pre=None):
        """pre: an event recorded before the capture, as the dispatch's previous_event; the
        combine then gets one recorded inside it, after the expert (its only input)."""
        rx, cnt, h, _, _ = buf.low_latency_dispatch(sx, st, T, E, previous_event=pre, **kw)
        y = expert(rx, cnt)
        cev = EventOverlap.record() if pre is not None else None
        holder.update(rx=rx, cnt=cnt, h=h, o=buf.low_latency_combine(y, st, sw, h, previous_event=cev)[0])

    def capture(kw, pre=False):
        spawn.phase("graph capture")
        # s must follow the current stream, where sx/st/sw were made and filled (torch's side
        # streams do not wait for it): without this, st's fill could still be pending when a
        # warm-up reads it, which once made one rank's host index check see poison and stop
        # while its peer's dispatch waited for it.
        s.wait_stream(torch.cuda.current_stream())
        ev = None
        with torch.cuda.stream(s):
            if pre:
                # Recorded before the capture: it orders nothing in the graph, and the kernels
                # must still be captured (not run once, now, on a comm stream left outside it).
                ev = EventOverlap.record()
            body(kw, ev)
            body(kw, ev)
        torch.cuda.synchronize()
        group.barrier()
        slot = ll._disp_slot  # the slot the graph's dispatch writes at every replay
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            body(kw, ev)
        torch.cuda.synchronize()
        group.barrier()
        return g, slot, dict(holder)

    def replay(g, slot, seed, what, fp8, hold=None):
        spawn.phase(what)
        hold = holder if hold is None else hold
        inputs = data(seed)
        xs, tks, ws = inputs
        sx.copy_(_up(xs[rank])); st.copy_(_up(tks[rank])); sw.copy_(_up(ws[rank]))
        _poison_results(hold["h"].refs["keep"])
        hold["o"].view(torch.int16).fill_(0x7F7F)
        torch.cuda.synchronize()
        group.barrier()
        g.replay()
        torch.cuda.synchronize()
        check(what, inputs, hold["rx"], hold["cnt"], hold["h"], hold["o"], fp8=fp8)
        group.barrier()

    g, slot, hold16 = capture(dict(use_fp8=False))
    for it in range(4):
        if it == 2:
            # Eager rounds between replays, one per slot: the second reuses the graph's results
            # (same shape: same tensors) and advances its slot's tags before replay 2.
            for e in range(2):
                spawn.phase(f"eager round {e} between graph replays")
                inputs = data(300 + e)
                xs, tks, ws = inputs
                x, t, w = _up(xs[rank]), _up(tks[rank]), _up(ws[rank])
                _poison_slot(ll, ll._disp_slot)
                rx, cnt, h, _, _ = buf.low_latency_dispatch(x, t, T, E, use_fp8=False)
                o = buf.low_latency_combine(expert(rx, cnt), t, w, h)[0]
                torch.cuda.synchronize()
                check(f"eager round {e} between replays", inputs, rx, cnt, h, o)
                group.barrier()
        replay(g, slot, 100 + it, f"graph replay {it}", False)
    # The FP8 dispatches use other results (another dtype); the bf16 graph's stay with the
    # buffer, so both graphs replay in turn.  Then a graph whose dispatch's previous_event was
    # recorded before the capture.
    g8, slot8, hold8 = capture(fp8kw)
    for it in range(2):
        replay(g8, slot8, 200 + it, f"fp8 graph replay {it}", True, hold8)
        replay(g, slot, 400 + it, f"bf16 graph replay {it} after the fp8 capture", False, hold16)
    gp, slotp, holdp = capture(dict(use_fp8=False), pre=True)
    for it in range(2):
        replay(gp, slotp, 500 + it, f"replay {it} of a graph captured with an earlier previous_event", False,
               holdp)
    replay(g8, slot8, 600, "fp8 graph replay after the previous_event graph", True, hold8)
    del g, g8, gp
    return fails


PUT_CASES = ["fp8_t128_h7168_e256_k8", "bf16_k16_e32_hook_zero_copy", "fp8_zero_copy_out", "fp8_ue8m0_t256_h7168",
             "fp8_h4096_async_previous_event", "fp8_partial_batch_n50_t128_stats_previous_event", "fp8_t1_k1",
             "bf16_t256_h2048_e288_k16", "logfmt_bf16_t128_h7168_e64_k8", "logfmt_fp8_h2560_hook_out",
             "wait_stats_fp8_t64_h2048"]
# Buffer(numerics="deepep"): DeepEP's FP8 scales and the FMA combine, LogFMT with FMA, on the full
# paths and (4 rounds, EPCOMM_CHECK_INDICES=0) the fast paths of the cases that can take them.
DEEPEP_CASES = ["fp8_t128_h7168_e256_k8", "bf16_t128_h4096_e64_k8", "fp8_round_scale_t256_h2048",
                "fp8_ue8m0_t256_h7168", "fp8_t128_h7168_e288_k8_hook_stats", "fp8_t1_k16_e32", "fp8_k1_out",
                "logfmt_bf16_t128_h7168_e64_k8", "logfmt_fp8_h2560_hook_out", "wait_stats_fp8_t64_h2048"]
DEEPEP_FAST = ["fp8_t128_h7168_e256_k8", "bf16_t128_h4096_e64_k8", "fp8_round_scale_t256_h2048",
               "fp8_ue8m0_t256_h7168", "fp8_t1_k16_e32", "fp8_k1_out"]
ROWS_CASES = ["fp8_t128_h7168_e256_k8", "bf16_k16_e32_hook_zero_copy", "fp8_zero_copy_out", "fp8_t1_k16_e32"]


@run_once
def _results(mode: str):
    """mode: "nvlink" (defaults), "put" (EPCOMM_LL_FORCE_NVSHMEM_PUT=1), "rows"
    (EPCOMM_LL_COMBINE_PARTIALS=0: one combine row per (token, expert) over NVLink) or "nodes"
    (nodes declared with EPCOMM_RANKS_PER_NODE: peers on other nodes through puts, those of the
    own node over NVLink).  The NVLink, put and nodes spawns end with the overlap pseudo-case."""
    env = {"EPCOMM_LL_FORCE_NVSHMEM_PUT": "1" if mode == "put" else "0",
           "EPCOMM_LL_COMBINE_PARTIALS": "0" if mode == "rows" else "1"}
    if mode == "nodes":
        env["EPCOMM_RANKS_PER_NODE"] = str(_declared_node_size(_world()))
    names = {"put": PUT_CASES, "rows": ROWS_CASES, "nodes": PUT_CASES}.get(mode)
    cases = CASES if names is None else [c for c in CASES if c["name"] in names]
    if mode in ("nvlink", "put", "nodes"):
        cases = cases + [OVERLAP]
    return spawn.run(_worker, _world(), cases, timeout=TEST_TIMEOUT.get(), env=env)


# The steady-state fast paths (torch, default flags, shapes seen before) serve calls only with
# EPCOMM_CHECK_INDICES=0 (as in `epcomm bench` and in production); 4 rounds: the first two
# prepare both slots, the last two (one per slot) go through the fast paths.  Poisoning the
# slots in between is fine: the plans keep pointing at the same tensors.
FAST_CASES = ["fp8_t128_h7168_e256_k8", "bf16_t128_h4096_e64_k8", "fp8_ue8m0_t256_h7168", "fp8_t1_k1",
              "fp8_k1_out", "bf16_t256_h2048_e288_k16"]


@run_once
def _results_fast():
    cases = [c for c in CASES if c["name"] in FAST_CASES]
    return spawn.run(_worker, _world(), cases, 4, timeout=TEST_TIMEOUT.get(),
                     env={"EPCOMM_CHECK_INDICES": "0"})


@run_once
def _results_deepep():
    cases = [c for c in CASES if c["name"] in DEEPEP_CASES]
    return spawn.run(_worker, _world(), cases, 4, "deepep", timeout=TEST_TIMEOUT.get(),
                     env={"EPCOMM_CHECK_INDICES": "0"})


def _assert_case(res, name):
    # Every rank's outcome: the first rank's error is often a timeout waiting for a peer whose
    # own error is the cause.
    bad = [f"rank {rank}: {v}" for rank, r in enumerate(res)
           if (v := r.get(name, "not run (an earlier case crashed)")) != "ok"]
    assert not bad, "\n".join(bad)


@needs_ll_ranks
@pytest.mark.parametrize("name", FAST_CASES, ids=[n + _R for n in FAST_CASES])
def test_low_latency_fast_paths_against_reference(name):
    res = _results_fast()
    _assert_case(res, name)
    for rank, r in enumerate(res):
        # rounds 3 and 4: dispatch and combine each through the fast path
        assert r["fast_calls:" + name] == 4, f"rank {rank}: {r['fast_calls:' + name]} fast-path calls, expected 4"


@needs_ll_ranks
@pytest.mark.parametrize("case", CASES, ids=[c["name"] + _R for c in CASES])
def test_low_latency_against_reference(case):
    _assert_case(_results("nvlink"), case["name"])


@needs_ll_ranks
@pytest.mark.parametrize("name", PUT_CASES, ids=[n + _R for n in PUT_CASES])
def test_low_latency_nvshmem_put_path(name):
    """EPCOMM_LL_FORCE_NVSHMEM_PUT=1: every peer through NVSHMEM puts/signals (the RDMA code path;
    with one rank only puts to itself)."""
    _assert_case(_results("put"), name)


def _declared_node_size(world: int) -> int:
    """Nodes of half the ranks (4 ranks: 2x2, both transports in one job), or of one rank."""
    return world // 2 if world >= 4 else 1


def _peers_worker(rank, world, group):
    import torch

    import epcomm
    torch.cuda.set_device(device_of(rank))
    buf = epcomm.Buffer(group, 0, epcomm.Buffer.get_low_latency_rdma_size_hint(16, 1024, world, 2 * world),
                        low_latency_mode=True)
    put = [r for r, ptr in enumerate(buf._ll.peers) if ptr == 0]
    buf.destroy()
    return put


@needs_two_ll_ranks
def test_low_latency_with_declared_nodes_reaches_other_nodes_by_puts():
    """EPCOMM_RANKS_PER_NODE: exactly the peers on other nodes are reached with NVSHMEM puts."""
    w = _world()
    P = _declared_node_size(w)
    res = spawn.run(_peers_worker, w, timeout=TEST_TIMEOUT.get(), env={"EPCOMM_RANKS_PER_NODE": str(P)})
    for rank, put in enumerate(res):
        assert put == [r for r in range(w) if r // P != rank // P], f"rank {rank}: puts to {put}"


@needs_two_ll_ranks
@pytest.mark.parametrize("name", PUT_CASES + ["overlap"], ids=[n + _R for n in PUT_CASES + ["overlap"]])
def test_low_latency_across_declared_nodes(name):
    _assert_case(_results("nodes"), name)


@needs_ll_ranks
@pytest.mark.parametrize("name", DEEPEP_CASES, ids=[n + _R for n in DEEPEP_CASES])
def test_low_latency_deepep_numerics_against_reference(name):
    """Buffer(numerics="deepep"): DeepEP V1's FP8 scales and FMA combine (LogFMT too), bit for
    bit against the reference with numerics="deepep"; the plain cases' last two rounds on the
    prepared fast paths."""
    res = _results_deepep()
    _assert_case(res, name)
    if name in DEEPEP_FAST:
        for rank, r in enumerate(res):
            assert r["fast_calls:" + name] == 4, f"rank {rank}: {r['fast_calls:' + name]} fast-path calls, expected 4"


@needs_ll_ranks
@pytest.mark.parametrize("name", ROWS_CASES, ids=[n + _R for n in ROWS_CASES])
def test_low_latency_combine_without_partials(name):
    """EPCOMM_LL_COMBINE_PARTIALS=0: the combine sends one bf16 row per (token, expert) over
    NVLink and the source adds them in k order."""
    _assert_case(_results("rows"), name)


@needs_ll_ranks
@pytest.mark.parametrize("mode", ["nvlink", "put"], ids=["nvlink" + _R, "put" + _R])
def test_two_micro_batches_with_hooks_and_graph_replays(mode):
    """The overlap pseudo-case at the end of the NVLink and the put spawns (see _overlap)."""
    _assert_case(_results(mode), "overlap")


@needs_ll_ranks
@pytest.mark.parametrize("mode", ["nvlink", "put", "rows", "fast"],
                         ids=[m + _R for m in ("nvlink", "put", "rows", "fast")])
def test_low_latency_clean_buffer_then_calls_go_on(mode):
    """clean_low_latency_buffer halfway through each spawn: a handle from before it raises
    BufferStateError; the cases after it (their own tests) prove the buffer works on."""
    _assert_case(_results_fast() if mode == "fast" else _results(mode), "clean_low_latency_buffer")


def _shapes_worker(rank, world, group):
    """Dispatches of two T alternating on a fresh buffer, three rounds of (T=256 into slot 0,
    T=128 into slot 1), same hidden size and experts, so both slots have been used equally often
    at each T=128 call.  Slot 1's messages of T=128 sit where the T=256 call's tokens
    128 R .. 256 R - 1 (counting every source's 256) did, every one of which went to every
    rank; with the slot's bare use count as the message tag those headers matched, and their
    tokens were received as rows of the T=128 call (the soak's mismatches).  Every output of
    both calls against the reference."""
    import ml_dtypes
    import torch

    import epcomm
    from epcomm import reference
    from epcomm.testing import random_bf16, random_weights
    torch.cuda.set_device(device_of(rank))
    H, E, K = 2048, 8 * world, world
    L = E // world
    buf = epcomm.Buffer(group, 0, epcomm.Buffer.get_low_latency_rdma_size_hint(256, H, world, E),
                        low_latency_mode=True)
    partials = _partial_pairs(buf, rank, world)
    rng = np.random.default_rng(23)
    out = {}
    for it in range(3):
        for T, N in ((256, 256), (128, 5)):
            name = f"round {it}, T={T}"
            if T == 256:  # every token to expert `it` of every rank: each message goes everywhere
                tks = [np.tile(np.arange(world, dtype=np.int64) * L + it % L, (N, 1)) for _ in range(world)]
            else:
                tks = [np.argsort(rng.random((N, E)), axis=1)[:, :K].astype(np.int64) for _ in range(world)]
            ws = [random_weights(rng, tk) for tk in tks]
            xs = [random_bf16(rng, (N, H)) for _ in range(world)]
            ref = reference.low_latency_dispatch(xs, tks, T, E, use_fp8=False)
            recv, cnt, handle, _, _ = buf.low_latency_dispatch(_up(xs[rank]), _up(tks[rank]), T, E, use_fp8=False)
            out[f"{name}: slot"] = "ok" if handle.slot == (T == 128) else f"slot {handle.slot}"
            ys = [(r.recv_x.astype(np.float32) * np.float32(d + 1.5)).astype(ml_dtypes.bfloat16)
                  for d, r in enumerate(ref)]
            cref = reference.low_latency_combine(ys, tks, ws, [r.handle for r in ref], partials=partials)[rank]
            comb, _, _ = buf.low_latency_combine(_up(ys[rank]), _up(tks[rank]), _up(ws[rank]), handle)
            torch.cuda.synchronize()
            try:
                rr = ref[rank]
                _assert_bits(f"{name}: recv_count", _np(cnt), rr.recv_count)
                _assert_bits(f"{name}: layout_range", _np(handle.layout_range), rr.handle.layout_range)
                gx, src = _np(recv), _np(handle.src_info)
                for j in range(L):
                    c = int(rr.recv_count[j])
                    _assert_bits(f"{name}: src_info[{j}]", src[j, :c], rr.handle.src_info[j, :c])
                    _assert_bits(f"{name}: recv_x[{j}]", gx[j, :c], rr.recv_x[j, :c])
                _assert_bits(f"{name}: combined", _np(comb), cref)
                out[name] = "ok"
            except AssertionError as e:
                out[name] = str(e)
            group.barrier()
    buf.destroy()
    return out


@needs_ll_ranks
def test_low_latency_shapes_alternating_between_the_slots():
    """No header another shape left in the other slot is taken for a message (_shapes_worker)."""
    assert_every_rank_ok(spawn.run(_shapes_worker, _world(), timeout=TEST_TIMEOUT.get()))


def _unique_topk(n, E, K):
    """Random top-k rows without repeated experts (the low-latency host check rejects repeats)."""
    import torch
    return torch.rand(n, E, device="cuda").argsort(dim=1)[:, :K].contiguous()


def _failure_worker(rank, world, group):
    import time

    import torch

    import epcomm
    from epcomm.errors import EpcommTimeoutError
    torch.cuda.set_device(device_of(rank))
    T, H, E, K = 32, 2048, 32, 4
    buf = epcomm.Buffer(group, 0, epcomm.Buffer.get_low_latency_rdma_size_hint(T, H, world, E), low_latency_mode=True)
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    topk = _unique_topk(T, E, K)
    out = {}
    try:
        buf.low_latency_dispatch(torch.randn(T + 1, H, device="cuda").to(torch.bfloat16),
                                 _unique_topk(T + 1, E, K), T, E)
        out["too_many_tokens"] = "no error"
    except ValueError as e:
        out["too_many_tokens"] = "ok" if "exceed" in str(e) else str(e)
    bad = topk.clone()
    bad[3, 1] = E
    try:
        buf.low_latency_dispatch(x, bad, T, E)
        out["index_out_of_range"] = "no error"
    except ValueError as e:
        out["index_out_of_range"] = "ok" if "outside [-1," in str(e) else str(e)
    try:
        buf.low_latency_dispatch(x, topk, 4 * T, 4 * E)
        out["too_small"] = "no error"
    except ValueError as e:
        out["too_small"] = "ok" if "need num_rdma_bytes >=" in str(e) else str(e)
    group.barrier()
    if rank == 0:
        t0 = time.monotonic()
        buf.low_latency_dispatch(x, topk, T, E)  # the peer never sends: the kernel gives up
        try:
            buf.synchronize()
            out["timeout"] = "no error"
        except EpcommTimeoutError as e:
            dt = time.monotonic() - t0
            ok = "rank 0" in str(e) and "low_latency_dispatch" in str(e) and dt < 30
            out["timeout"] = "ok" if ok else f"bad: {dt:.1f}s {e}"
    else:
        time.sleep(10)
    group.barrier()
    return out


@needs_two_ll_ranks
def test_low_latency_bad_input_and_missing_peer():
    res = spawn.run(_failure_worker, _world(), timeout=180, env={"EPCOMM_TIMEOUT_S": "4"})
    for rank, r in enumerate(res):
        for k, v in r.items():
            assert v == "ok", f"rank {rank} {k}: {v}"
    assert "timeout" in res[0]


def _buffers_worker(rank, world, group):
    """Low-latency Buffers one after another in one process, each larger than the NVSHMEM heap
    reserved by the first (NVSHMEM is initialised once per process): a larger one while the
    first lives, then, both destroyed, one larger still.  Each runs a checked round."""
    import torch

    import epcomm
    torch.cuda.set_device(device_of(rank))
    small = _case("buffers_small", T=16, H=2048, E=32, K=4)
    large = _case("buffers_large", T=256, H=7168, E=256)
    out = {}

    def go(what, buf, case, it):
        spawn.phase(what)
        try:
            _round(rank, world, group, buf, case, it, None)
            out[what] = "ok"
        except Exception as e:
            out[what] = f"{type(e).__name__}: {e}"
        torch.cuda.synchronize()
        group.barrier()

    def make(what, nbytes):
        spawn.phase(what)
        try:
            return epcomm.Buffer(group, 0, nbytes, low_latency_mode=True)
        except Exception as e:
            out[what] = f"{type(e).__name__}: {e}"
            return None

    a = make("first buffer", _hint(small, world))
    go("round on the first buffer", a, small, 0)
    b = make("larger buffer while the first lives", _hint(large, world))
    if b is not None:
        go("round on the larger buffer", b, large, 0)
        go("the first buffer again", a, small, 1)
        b.destroy()
    a.destroy()
    c = make("a buffer larger still, after both", 2 * _hint(large, world))
    if c is not None:
        go("round on the last buffer", c, large, 1)
        c.destroy()
    return out


@needs_ll_ranks
def test_low_latency_buffers_of_growing_size_in_one_process():
    res = spawn.run(_buffers_worker, _world(), timeout=240)
    for rank, r in enumerate(res):
        bad = {k: v for k, v in r.items() if v != "ok"}
        assert not bad and len(r) == 4, f"rank {rank}: {r}"  # the four rounds (a failed Buffer adds its entry)


def _shape_mismatch_worker(rank, world, group):
    import time

    import torch

    import epcomm
    from epcomm.errors import BufferStateError, RankMismatchError
    torch.cuda.set_device(device_of(rank))
    T, H, E, K = 32, 2048, 32, 4
    last = world - 1  # passes twice the T of the others
    buf = epcomm.Buffer(group, 0, epcomm.Buffer.get_low_latency_rdma_size_hint(2 * T, H, world, E),
                        low_latency_mode=True)
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    topk = _unique_topk(T, E, K)
    out = {}
    t0 = time.monotonic()
    try:
        buf.low_latency_dispatch(x, topk, 2 * T if rank == last else T, E)
        buf.synchronize()  # the receive found the mismatch; the host raises at the next check
        out["mismatch"] = "no error"
    except RankMismatchError as e:
        dt = time.monotonic() - t0
        ok = (e.field == "num_max_dispatch_tokens_per_rank" and e.rank == rank and dt < 20
              and (rank == last or e.peer == last) and f"is {2 * T if rank == last else T} here" in str(e))
        out["mismatch"] = "ok" if ok else f"bad: {dt:.1f}s field={e.field} peer={e.peer}: {e}"
    try:
        buf.low_latency_dispatch(x, topk, T, E)
        out["poisoned"] = "no error"
    except BufferStateError:
        out["poisoned"] = "ok"
    group.barrier()
    buf.destroy()
    return out


@needs_two_ll_ranks
def test_low_latency_ranks_with_different_shapes_raise_naming_the_field():
    res = spawn.run(_shape_mismatch_worker, _world(), timeout=180, env={"EPCOMM_TIMEOUT_S": "60"})
    assert_every_rank_ok(res)


def _partials_mismatch_worker(rank, world, group):
    import time

    import torch

    import epcomm
    from epcomm.errors import RankMismatchError
    torch.cuda.set_device(device_of(rank))
    T, H, E, K = 32, 2048, 32, 4
    buf = epcomm.Buffer(group, 0, epcomm.Buffer.get_low_latency_rdma_size_hint(T, H, world, E),
                        low_latency_mode=True)
    buf._ll.set_combine_partials(rank != 0)  # rank 0 alone sends one row per (token, expert)
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    topk = _unique_topk(T, E, K)
    out = {}
    t0 = time.monotonic()
    try:
        buf.low_latency_dispatch(x, topk, T, E)
        buf.synchronize()
        out["mismatch"] = "no error"
    except RankMismatchError as e:
        dt = time.monotonic() - t0
        ok = e.field == "EPCOMM_LL_COMBINE_PARTIALS" and dt < 20 and (rank == 0 or e.peer == 0)
        out["mismatch"] = "ok" if ok else f"bad: {dt:.1f}s field={e.field} peer={e.peer}: {e}"
    group.barrier()
    buf.destroy()
    return out


@needs_two_ll_ranks
def test_low_latency_ranks_with_different_combine_settings_raise_at_the_dispatch():
    """The combine's row format depends on EPCOMM_LL_COMBINE_PARTIALS: ranks that differ must
    not combine; the dispatch's shape word carries the setting and every rank raises."""
    res = spawn.run(_partials_mismatch_worker, _world(), timeout=180, env={"EPCOMM_TIMEOUT_S": "60"})
    assert_every_rank_ok(res)


def _bad_index_worker(rank, world, group):
    """Rank 0 passes an out-of-range expert id with the host check off: the kernels skip it as
    if it were -1, every rank completes, and rank 0's next check names the kernel and token."""
    import ml_dtypes
    import torch

    import epcomm
    from epcomm import reference
    from epcomm.testing import random_bf16, random_topk, random_weights
    torch.cuda.set_device(device_of(rank))
    T, H, E, K = 32, 2048, 8 * world, 4
    rng = np.random.default_rng(5)
    tks = [random_topk(rng, T, E, K) for _ in range(world)]
    ws = [random_weights(rng, t) for t in tks]
    xs = [random_bf16(rng, (T, H)) for _ in range(world)]
    skipped = [t.copy() for t in tks]
    skipped[0][3, 1] = -1
    bad = tks[rank].copy()
    if rank == 0:
        bad[3, 1] = E + 5
    buf = epcomm.Buffer(group, 0, epcomm.Buffer.get_low_latency_rdma_size_hint(T, H, world, E), low_latency_mode=True)
    out = {}
    ref = reference.low_latency_dispatch(xs, skipped, T, E, use_fp8=False)
    recv, cnt, handle, _, _ = buf.low_latency_dispatch(_up(xs[rank]), _up(bad), T, E, use_fp8=False)
    torch.cuda.synchronize()
    try:
        rr = ref[rank]
        _assert_bits("recv_count", _np(cnt), rr.recv_count)
        gx = _np(recv)
        for j in range(E // world):
            c = int(rr.recv_count[j])
            _assert_bits(f"recv_x[{j}]", gx[j, :c], rr.recv_x[j, :c])
        out["dispatch"] = "ok"
    except AssertionError as e:
        out["dispatch"] = str(e)
    for name, kernel in (("dispatch_report", "low_latency_dispatch"), ("combine_report", "low_latency_combine")):
        if name == "combine_report":
            ys = [(r.recv_x.astype(np.float32) * np.float32(d + 1.5)).astype(ml_dtypes.bfloat16) for d, r in enumerate(ref)]
            cref = reference.low_latency_combine(ys, skipped, ws, [r.handle for r in ref],
                                                 partials=buf._ll.partials and not buf._ll.force_put)[rank]
            comb, _, _ = buf.low_latency_combine(_up(ys[rank]), _up(bad), _up(ws[rank]), handle)
            torch.cuda.synchronize()
            try:
                _assert_bits("combined", _np(comb), cref)
                out["combine"] = "ok"
            except AssertionError as e:
                out["combine"] = str(e)
        try:
            buf.check()
            out[name] = "ok" if rank != 0 else "no error"
        except ValueError as e:
            msg = str(e)
            ok = rank == 0 and msg.startswith(kernel) and f"expert index {E + 5} (token 3)" in msg
            out[name] = "ok" if ok else f"bad: {msg}"
        group.barrier()
    # The buffer stays usable: a clean round trip, every output compared.
    ref = reference.low_latency_dispatch(xs, tks, T, E, use_fp8=False)
    recv, cnt, handle, _, _ = buf.low_latency_dispatch(_up(xs[rank]), _up(tks[rank]), T, E, use_fp8=False)
    ys = [(r.recv_x.astype(np.float32) * np.float32(d + 2.5)).astype(ml_dtypes.bfloat16) for d, r in enumerate(ref)]
    cref = reference.low_latency_combine(ys, tks, ws, [r.handle for r in ref],
                                         partials=buf._ll.partials and not buf._ll.force_put)[rank]
    comb, _, _ = buf.low_latency_combine(_up(ys[rank]), _up(tks[rank]), _up(ws[rank]), handle)
    torch.cuda.synchronize()
    try:
        rr = ref[rank]
        _assert_bits("usable recv_count", _np(cnt), rr.recv_count)
        _assert_bits("usable layout_range", _np(handle.layout_range), rr.handle.layout_range)
        gx, src = _np(recv), _np(handle.src_info)
        for j in range(E // world):
            c = int(rr.recv_count[j])
            _assert_bits(f"usable src_info[{j}]", src[j, :c], rr.handle.src_info[j, :c])
            _assert_bits(f"usable recv_x[{j}]", gx[j, :c], rr.recv_x[j, :c])
        _assert_bits("usable combined", _np(comb), cref)
        out["usable"] = "ok"
    except AssertionError as e:
        out["usable"] = str(e)
    group.barrier()
    buf.destroy()
    return out


@needs_ll_ranks
def test_low_latency_bad_expert_index_seen_on_the_device_is_reported_and_skipped():
    res = spawn.run(_bad_index_worker, _world(), timeout=180,
                    env={"EPCOMM_CHECK_INDICES": "0", "EPCOMM_TIMEOUT_S": "20"})
    assert_every_rank_ok(res)
