"""The benchmark's checks of its results against :mod:`epcomm.reference`: every rank gathers all
ranks' inputs once, before the timings, and compares its outputs bit for bit afterwards (never
inside a timed loop).  A verdict is "ok" or a short description of the first difference; a
failed check is recorded, never raised.  ``torch`` is passed in (the module is imported
without it)."""
from __future__ import annotations

import numpy as np

from epcomm import interop, reference
from epcomm.testing import bit_mismatch

INT_OF_WIDTH = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def diff(name: str, got, exp) -> list[str]:
    """[] if ``got`` equals ``exp`` bit for bit (integer arrays of different widths: by value),
    else one line: how many elements differ and the first.  Two torch tensors are compared on
    their device; otherwise on the host (a torch ``got`` is copied)."""
    if not isinstance(got, np.ndarray) and not isinstance(exp, np.ndarray):  # both torch
        import torch
        if tuple(got.shape) != tuple(exp.shape):
            return [f"{name}: shape {tuple(got.shape)}, expected {tuple(exp.shape)}"]
        if got.element_size() != exp.element_size():
            return [f"{name}: dtype {got.dtype}, expected {exp.dtype}"]
        it = getattr(torch, INT_OF_WIDTH[got.element_size()])
        ne = got.contiguous().view(it) != exp.contiguous().view(it)
        n = int(ne.sum())
        if not n:
            return []
        first = tuple(int(v) for v in ne.nonzero()[0].tolist())
        return [f"{name}: {n} of {ne.numel()} elements differ (first at {first})"]
    if not isinstance(got, np.ndarray):
        got = interop.to_numpy(got)
    bad = bit_mismatch(name, got, exp)
    return [bad] if bad else []


def verdict(problems: list[str]) -> str:
    """"ok" for no problems, else the problems joined (at most 600 characters)."""
    return "ok" if not problems else "; ".join(problems)[:600]


def checked(error: str | None, problems, *args) -> str:
    """A check's verdict: ``error`` (the reference could not be computed) if set, else that of
    ``problems(*args)`` (a list of problems), or what it raised: a check never stops the
    benchmark."""
    if error:
        return error
    try:
        return verdict(problems(*args))
    except Exception as e:  # noqa: BLE001
        return f"check raised {type(e).__name__}: {e}"


def record_check(checks: dict, op: str, result: str, where: str = "") -> None:
    """Keep "ok" or the first failure of ``op`` (``where``: e.g. the SM count)."""
    if result == "ok":
        checks.setdefault(op, "ok")
    elif checks.get(op, "ok") == "ok":
        checks[op] = f"{where}: {result}" if where else result


def gatherer(torch, dist, group=None):
    """``gather(name, t)``, the checks' way of seeing every rank's inputs: over the NCCL group
    ``dist``, or without one (ranks sharing a GPU, where NCCL refuses to run) over the epcomm
    ``group`` through host copies."""
    if dist is None:
        return _group_gather(torch, group)

    def gather(name, t):
        """Every rank's ``t`` stacked in rank order (one NCCL all-gather)."""
        t = t.contiguous()
        out = torch.empty((dist.get_world_size(), *t.shape), dtype=t.dtype, device=t.device)
        dist.all_gather_into_tensor(out, t)
        return out
    return gather


def _group_gather(torch, group):
    def gather(name, t):
        """Every rank's ``t`` (same shape and dtype on every rank) stacked in rank order, on
        ``t``'s device: its bytes through ``group.allgather_bytes``."""
        t = t.contiguous()
        raw = t.reshape(-1).view(torch.uint8).cpu().numpy().tobytes()
        parts = group.allgather_bytes(raw)
        flat = torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)
        return flat.to(t.device).view(t.dtype).reshape(len(parts), *t.shape)
    return gather


class NormalCheck:
    """This rank's expected normal-mode outputs, from every rank's inputs (gathered once with
    ``gather(name, tensor)`` -> [R, ...], before the timings).

    The contract is epcomm.reference's: on each destination, rows ordered by source rank, then
    source token, data and scales copied bit for bit; combine = bf16 of the fp32 sum over the
    destination ranks (across nodes, ``num_ranks_per_node`` given: each node's ranks into a
    partial, then the partials, reference.combine's node-first order).
    epcomm.reference.dispatch and .combine run on every rank's routing and
    on 64 sampled columns of the data: they give the source indices, rank prefix, top-k indices
    and weights, per-expert counts, those columns of the rows and of the combine.  The full
    width of every row is then compared on the device with the gathered inputs at the
    reference's source indices.  The combine's input is the received rows times 2**rank (exact
    in bf16), so its exact result is bf16(x * sum of 2**d over the destinations d of the
    token): each destination's rows show, and with at most :attr:`MAX_RANKS` ranks the fp32 sum
    has at most 24 significant bits (8 of x, 16 of the sum of powers of two), so it is exact in
    any order and its full width is checked on the device too.

    ``error`` is set (and every check returns it) if the reference could not be computed.
    :attr:`topk_all`: every rank's top-k, int64 [R, N, K] (NumPy), as gathered.
    """

    MAX_RANKS = 16

    def __init__(self, torch, gather, rank: int, world: int, x, xq, xs, topk, w, num_experts: int,
                 num_ranks_per_node: int | None = None):
        self.torch, self.rank, self.rpn = torch, rank, num_ranks_per_node
        # The collectives first, alike on every rank whatever happens below.
        x_all = gather("x", x)
        xq_all = gather("xq", xq.view(torch.uint8))
        xs_all = gather("xs", xs)
        topk_all = self.topk_all = gather("topk", topk).cpu().numpy()
        w_all = gather("w", w).cpu().numpy()
        self.error = None
        try:
            self._prepare(x, x_all, xq_all, xs_all, topk_all, w_all, world, num_experts)
        except Exception as e:  # noqa: BLE001 - recorded as every check's verdict
            self.error = f"reference not computed: {type(e).__name__}: {e}"

    def _prepare(self, x, x_all, xq_all, xs_all, topk_all, w_all, R, E):
        torch = self.torch
        _, N, H = x_all.shape
        dev = x.device
        self.cols = torch.arange(0, H, max(1, H // 64), device=dev)
        xsl = [interop.to_numpy(x_all[r][:, self.cols]) for r in range(R)]
        refs = reference.dispatch(xsl, E, topk_idx=[topk_all[r] for r in range(R)],
                                  topk_weights=[w_all[r] for r in range(R)])
        me = self.me = refs[self.rank]
        ys = [(r.recv_x.astype(np.float32) * np.float32(2.0 ** d)).astype(reference.BF16) for d, r in enumerate(refs)]
        self.comb_cols = reference.combine(ys, [r.handle for r in refs],
                                           num_ranks_per_node=self.rpn)[self.rank][0]
        prefix = me.handle.rank_prefix.astype(np.int64)
        src = np.repeat(np.arange(R, dtype=np.int64), np.diff(prefix)) * N + me.handle.recv_src_idx.astype(np.int64)
        gidx = torch.from_numpy(src).to(dev)
        self.x_rows = x_all.reshape(R * N, H)[gidx]
        self.xq_rows = xq_all.reshape(R * N, H)[gidx]
        self.xs_rows = xs_all.reshape(R * N, -1)[gidx]
        coef = (me.handle.is_token_in_rank.astype(np.float32) * (2.0 ** np.arange(R, dtype=np.float32))).sum(1)
        self.comb_full = (x.float() * torch.from_numpy(coef).to(dev)[:, None]).to(torch.bfloat16)

    def combine_input(self, recv_x):
        """The combine's input made from a BF16 dispatch's rows: times 2**rank (exact)."""
        return (recv_x.float() * float(2 ** self.rank)).to(self.torch.bfloat16)

    def dispatch(self, result, fp8: bool, meta: bool) -> str:
        """``result``: a dispatch's return tuple.  ``meta``: also the handle, top-k and counts
        (a full dispatch's; a cached dispatch returns none of them)."""
        return checked(self.error, self._dispatch, result, fp8, meta)

    def _dispatch(self, result, fp8, meta):
        torch = self.torch
        recv_x, rti, rtw, counts, h, _ = result
        data, scales = recv_x if fp8 else (recv_x, None)
        me = self.me
        M = int(me.handle.num_recv_tokens)
        if data.shape[0] != M:
            return [f"{data.shape[0]} rows received, the reference has {M}"]
        p = []
        if fp8:
            p += diff("recv_x (e4m3 bytes)", data.view(torch.uint8), self.xq_rows)
            p += diff("recv_x_scales", scales, self.xs_rows)
        else:
            p += diff("recv_x", data, self.x_rows)
            p += diff("recv_x sampled columns vs reference.dispatch", data[:, self.cols], me.recv_x)
        if meta:
            p += diff("recv_src_idx", h.recv_src_idx, me.handle.recv_src_idx)
            p += diff("rank_prefix", h.rank_prefix, me.handle.rank_prefix)
            want = tuple(int(v) for v in np.diff(me.handle.rank_prefix.astype(np.int64)))
            if tuple(h.recv_counts or ()) != want:
                p.append(f"recv_counts {tuple(h.recv_counts or ())}, expected {want}")
            p += diff("recv_topk_idx", rti, me.recv_topk_idx)
            p += diff("recv_topk_weights", rtw, me.recv_topk_weights)
            if list(counts) != list(me.num_recv_tokens_per_expert_list):
                p.append("num_recv_tokens_per_expert_list differs from the reference")
        return p

    def combine(self, combined) -> str:
        """``combined``: the combine's output for the input :meth:`combine_input` made."""
        return checked(self.error, lambda: diff("combined_x", combined, self.comb_full)
                        + diff("combined_x sampled columns vs reference.combine", combined[:, self.cols],
                                self.comb_cols))


class LLCheck:
    """This rank's expected low-latency outputs (epcomm.reference.low_latency_dispatch with FP8,
    and low_latency_combine), from every rank's inputs gathered once before the timings.

    The combine's input is built from the expected dispatch output: expert j of rank d returns
    bf16(dequantised row x (d + 1.5) x (1 + j / 64)), so every expert's rows differ and the order
    of the combine's additions shows; rows past recv_count are zeros (the combine never reads
    them).  :attr:`y` is this rank's input (None if the reference could not be computed: every
    check then returns :attr:`error`).  The expected combine is computed with the partial sums
    as the buffer sends them (``partials``, see reference.low_latency_combine) and the other way
    (the benchmark's A/B of the two combine formats): ``pairs`` maps each setting (False, True)
    to the [R, R] (source, expert-side rank) pairs that send partials with it
    (``LowLatencyState.partial_pairs``: none across nodes), ``partials`` is the buffer's."""

    def __init__(self, torch, gather, rank: int, world: int, x, topk, w, T: int, E: int, partials: bool,
                 pairs: dict):
        self.torch, self.rank, self.partials, self.pairs = torch, rank, bool(partials), pairs
        x_all = gather("x", x)
        topk_all = gather("topk", topk).cpu().numpy()
        w_all = gather("w", w).cpu().numpy()
        self.y = None
        self.error = None
        try:
            self._prepare(x, x_all, topk_all, w_all, world, T, E)
        except Exception as e:  # noqa: BLE001
            self.error = f"reference not computed: {type(e).__name__}: {e}"

    def _prepare(self, x, x_all, topk_all, w_all, R, T, E):
        torch = self.torch
        xs = [interop.to_numpy(x_all[r]) for r in range(R)]
        tks = [topk_all[r] for r in range(R)]
        ws = [w_all[r] for r in range(R)]
        ref = reference.low_latency_dispatch(xs, tks, T, E, use_fp8=True)
        ys = []
        for d, r in enumerate(ref):
            y = np.zeros(r.recv_x.shape, dtype=reference.BF16)
            m = np.arange(R * T)[None, :] < r.recv_count[:, None]
            j = np.nonzero(m)[0].astype(np.float32)
            rows = r.recv_x[m].astype(np.float32) * np.repeat(r.recv_x_scales[m], reference.FP8_GROUP, axis=1)
            y[m] = (rows * np.float32(d + 1.5) * (1 + j / 64)[:, None]).astype(reference.BF16)
            ys.append(y)
        handles = [r.handle for r in ref]
        self.expected = {p: reference.low_latency_combine(ys, tks, ws, handles, partials=self.pairs[p])[self.rank]
                         for p in (False, True)}
        me = self.me = ref[self.rank]
        self.mask_np = np.arange(R * T)[None, :] < me.recv_count[:, None]
        self.mask = torch.from_numpy(self.mask_np).to(x.device)
        self.y = interop.from_numpy("torch", ys[self.rank], x.device.type, x.device.index or 0)

    def dispatch(self, recv_x, recv_count, handle) -> str:
        """An FP8 dispatch's ``(data, scales)``, counts and handle, against the reference: the
        rows below each expert's count (bytes, scales, source token), the counts and ranges."""
        return checked(self.error, self._dispatch, recv_x, recv_count, handle)

    def _dispatch(self, recv_x, recv_count, handle) -> list[str]:
        torch, me, m, mn = self.torch, self.me, self.mask, self.mask_np
        data, scales = recv_x
        p = diff("recv_count", recv_count, me.recv_count)
        if not p:
            p += diff("recv_x rows (e4m3 bytes)", data.view(torch.uint8)[m], me.recv_x[mn])
            p += diff("recv_x_scales rows", scales[m], me.recv_x_scales[mn])
            p += diff("src_info rows", handle.src_info[m], me.handle.src_info[mn])
            p += diff("layout_range", handle.layout_range, me.handle.layout_range)
        return p

    def combine(self, combined, partials: bool | None = None) -> str:
        """A combine's output for input :attr:`y` (``partials``: the setting it ran with;
        default the buffer's)."""
        p = self.partials if partials is None else bool(partials)
        return checked(self.error, lambda: diff("combined_x", combined, self.expected[p]))
