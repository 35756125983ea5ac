"""The benchmark's byte accounting (DeepEP's, README "Performance"), GB/s, the bytes of the
internode route per link, and the buffer sizes it reports: DeepEP's size hints recomputed for
the same shape, epcomm's heap regions."""
from __future__ import annotations

import math

import numpy as np

from epcomm import reference
from epcomm.kernels import intranode as K_intra
from epcomm.kernels import low_latency as K_ll

FP8_GROUP = 128


def normal_row_bytes(hidden: int) -> dict:
    """Bytes per received row in DeepEP's normal-mode accounting: BF16 2H; FP8 H + 4H/128 (data
    plus one float32 scale per 128 channels; top-k entries are not counted)."""
    return {"bf16": 2 * hidden, "fp8": hidden + hidden // FP8_GROUP * 4}


def ll_row_bytes(hidden: int) -> dict:
    """Bytes per selection in the low-latency accounting (the guide, section 5): FP8 dispatch
    H + 4H/128 + 16, BF16 combine 2H."""
    return {"dispatch": hidden + hidden // FP8_GROUP * 4 + 16, "combine": 2 * hidden}


def gbps(nbytes: float, us: float) -> float:
    """GB/s (1e9 bytes per second) of ``nbytes`` moved in ``us`` microseconds; NaN without a time."""
    if us is None or not us > 0 or math.isnan(us):
        return float("nan")
    return nbytes / us / 1e3


def internode_route_rows(topk_list, num_experts: int, num_ranks_per_node: int) -> dict[str, np.ndarray]:
    """Rows per rank of one internode dispatch of this routing, int64 [R] each.

    ``topk_list``: every rank's top-k, int [N, K] (-1 = none); rank r holds experts
    ``r * E/R .. (r + 1) * E/R - 1``; nodes of ``num_ranks_per_node`` consecutive ranks.  Keys:

    * ``recv``: rows the rank receives, its own included (the normal mode's accounting);
    * ``deepep_rdma``: (token, destination node) pairs of the rank's own tokens, its own node
      included: the numerator of DeepEP's internode "RDMA" GB/s;
    * ``net_send``, ``net_recv``, ``nvl_send``, ``nvl_recv``: the route's rows between nodes and
      over NVLink inside a node (:func:`epcomm.reference.internode_traffic`; a rank's own rows
      on no link).

    Raises ValueError/TypeError as :func:`epcomm.reference.get_dispatch_layout` and
    ``internode_traffic`` do (e.g. E not a multiple of R, R not a multiple of P)."""
    R = len(topk_list)
    lays = [reference.get_dispatch_layout(np.asarray(t), num_experts, R, num_ranks_per_node) for t in topk_list]
    itrs = [lay.is_token_in_rank for lay in lays]
    tr = reference.internode_traffic(itrs, num_ranks_per_node, 1)
    per_node = [lay.num_tokens_per_rdma_rank for lay in lays]
    return {"recv": np.sum([itr.sum(axis=0, dtype=np.int64) for itr in itrs], axis=0, dtype=np.int64),
            "deepep_rdma": np.array([int(c.sum()) if c is not None else 0 for c in per_node], dtype=np.int64),
            "net_send": tr.net_send, "net_recv": tr.net_recv, "nvl_send": tr.nvl_send, "nvl_recv": tr.nvl_recv}


def internode_op_rates(rows: dict, row_bytes: int, us: float, combine: bool = False) -> dict:
    """One rank's GB/s of one internode operation taking ``us`` microseconds.

    ``rows``: that rank's entry of :func:`internode_route_rows` (ints; ``recv`` may be the rows
    a dispatch actually returned).  ``row_bytes``: the accounting's row
    (:func:`normal_row_bytes`; BF16 for a combine).  ``combine``: the same rows go the other
    way, so the sends and receives of each link swap.  Returns:

    * ``GBps``: ``recv`` rows / time (the normal mode's accounting; a combine's rows sent back);
    * ``rdma_GBps``: ``deepep_rdma`` rows / time (DeepEP's internode "RDMA" accounting, which
      counts the same numerator for its combine);
    * ``route_bytes``: ``{net_send, net_recv, nvl_send, nvl_recv}``, rows x ``row_bytes``;
    * ``net_GBps``, ``nvl_GBps``: the busier direction of each link (max of send and receive
      bytes) / time, as ``epcomm plan`` bounds a full-duplex link.

    The route's bytes are rows of the accounting's size, not epcomm's messages (which add
    indices and weights; its combine sends fp32 partials between nodes: twice the BF16 rows)."""
    b = {k: int(rows[k]) * row_bytes for k in ("net_send", "net_recv", "nvl_send", "nvl_recv")}
    if combine:
        b = {"net_send": b["net_recv"], "net_recv": b["net_send"], "nvl_send": b["nvl_recv"],
             "nvl_recv": b["nvl_send"]}
    return {"GBps": gbps(int(rows["recv"]) * row_bytes, us), "rdma_GBps": gbps(int(rows["deepep_rdma"]) * row_bytes, us),
            "route_bytes": b, "net_GBps": gbps(max(b["net_send"], b["net_recv"]), us),
            "nvl_GBps": gbps(max(b["nvl_send"], b["nvl_recv"]), us)}


def _align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def deepep_ll_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                             num_experts: int) -> int:
    """DeepEP's ``Buffer.get_low_latency_rdma_size_hint`` for the same shape, recomputed from its
    formula (deepseek-ai/DeepEP, ``LowLatencyLayout`` and ``get_low_latency_rdma_size_hint`` in
    csrc/config.hpp, csrc/legacy/config.hpp since EPv2; the form since its 10-bit LogFMT
    combine (2025-08), whose combine message carries a bf16x2 min/max per 128 channels): two
    send buffers of max(T x dispatch message, E x T x combine message), two receive buffers of
    E x T x the larger message, two signalling buffers of E ints (aligned to 128), the total
    rounded up past the next multiple of 128 (NUM_BUFFER_ALIGNMENT_BYTES).
    Dispatch message: 16 + max(2H, H + 4H/128); combine message: 4H/128 + 2H.
    1908.4 MB at T=128, H=7168, 256 experts; the rank count does not enter."""
    T, H, E = num_max_dispatch_tokens_per_rank, hidden, num_experts
    scales = H // 128
    disp_msg = 16 + max(2 * H, H + 4 * scales)
    comb_msg = 4 * scales + 2 * H
    send = max(T * disp_msg, E * T * comb_msg)
    recv = max(E * T * disp_msg, E * T * comb_msg)
    signal = _align_up(E * 4, 128)
    total = 2 * send + 2 * recv + 2 * signal
    return (total + 128) // 128 * 128


def deepep_nvl_buffer_size_hint(hidden: int, num_ranks: int, num_sms: int = 20, recv_tokens: int = 256) -> int:
    """DeepEP's ``Config.get_nvl_buffer_size_hint`` for BF16 rows within one node (num_ranks <= 8),
    with its defaults (``Buffer.num_sms`` = 20, ``num_max_nvl_chunked_recv_tokens`` = 256 in the
    default dispatch and combine configs for 2, 4 and 8 ranks; deep_ep/buffer.py and
    csrc/config.hpp): per channel (num_sms / 2) and rank, control ints plus recv_tokens x (row +
    8-byte source meta + 128 int64 top-k + 128 float weights + 128 float scales), rounded up to
    128.  About 336 MB at R=8, H=7168."""
    ch = num_sms // 2
    n = num_ranks
    b = ch * n * (2 * 1 + 3) * 4
    b += ch * n * recv_tokens * (2 * hidden + 8 + 128 * 8 + 128 * 4 + 128 * 4)
    return _align_up(b, 128)


def nvl_buffer_sizes(args: dict) -> dict:
    """NVLink buffer bytes per rank that epcomm needs for this shape (its size hint: every token
    of every rank may go to every rank) and DeepEP's default hint, for 2, 4 and 8 ranks.
    ``args``: the normal mode's (``hidden``, ``tokens``, ``topk``)."""
    H, N, K = args["hidden"], args["tokens"], args["topk"]
    return {"epcomm_bytes_by_ranks": {R: K_intra.nvl_buffer_size_hint(H, R, N, K) for R in (2, 4, 8)},
            "deepep_hint_bytes_by_ranks": {R: deepep_nvl_buffer_size_hint(H, R) for R in (2, 4, 8)},
            "deepep_hint_settings": "num_sms 20, num_max_nvl_chunked_recv_tokens 256 (DeepEP's defaults)"}


def heap_breakdown(T: int, H: int, E: int, R: int) -> dict:
    """The regions of epcomm's low-latency symmetric heap (``HeapLayout.make``), in bytes."""
    lay = K_ll.HeapLayout.make(T, H, E, R)
    return {
        "control_words": lay.disp_region_off,
        "dispatch_receive (2 slots x R x T messages)": lay.comb_w_off - lay.disp_region_off,
        "combine_weights (2 x R x T x 32 floats)": lay.comb_region_off - lay.comb_w_off,
        "combine_receive (2 x T x 32 rows of 2H)": lay.disp_send_off - lay.comb_region_off,
        "dispatch_send (2 x T messages)": lay.comb_send_off - lay.disp_send_off,
        "combine_send (2 x E x T rows of 2H)": lay.total - lay.comb_send_off,
        "logfmt_receive (2 x T x 32 rows of H/128 words)": lay.lf_stage_off - lay.lf_meta_off,
        "logfmt_send (2 x E x T rows of H/128 words)": lay.lf_total - lay.lf_stage_off,
        "total": lay.lf_total,
        "message_bytes": lay.msg_bytes,
    }


def parse_size(text: str) -> int | None:
    """NVSHMEM's size syntax (bytes, or a k/m/g/t suffix, powers of 1024); None if unreadable."""
    t = (text or "").strip().lower().rstrip("b")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(t) if t else None
    except ValueError:
        return None
