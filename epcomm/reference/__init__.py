"""NumPy reference of every epcomm communication operation: the executable specification.

Every function simulates all R ranks of an expert-parallel group at once: per-rank arguments
are Python lists (or tuples) indexed by rank, and results come back as lists indexed by rank.
The GPU tests compare the kernels with these functions, bit for bit where the contract says
so, so the order of floating-point operations written here is part of the specification.

Notation
    R  ranks (the length of the per-rank lists)
    E  experts, L = E // R local experts per rank (E % R == 0 is required); expert e lives on
       rank e // L with local index e % L
    N_r  tokens on rank r, H hidden size, K top-k, T max tokens per rank (low-latency mode)
    topk_idx  int64 [N, K], -1 marks an unused slot; topk_weights float32 [N, K]

Modules: ``layout`` (routing counts), ``normal`` (dispatch/combine; the combine's summation
order across nodes with ``num_ranks_per_node``), ``traffic`` (bytes per rank over the network
and NVLink along the internode route), ``fp8`` (quantisation and UE8M0 packing),
``low_latency`` (packed-layout dispatch/combine), ``logfmt`` (the combine's optional 10-bit
log format), ``masks`` (the routing that masked ranks leave, for shrink mode); argument rules shared with the GPU path come from :mod:`epcomm.validate`.

Numerics: the dispatch's FP8 scales and both combines take ``numerics="deepep"`` to follow
DeepEP V1's arithmetic where it differs from epcomm's (each function's docstring says how).

Nodes: with ``num_ranks_per_node`` P, rank r is local index r % P of node r // P.

Dtypes: activations are ``ml_dtypes.bfloat16`` (or ``ml_dtypes.float8_e4m3fn`` with float32
scales, one per token and 128 channels).  Only numpy, ml_dtypes and epcomm.validate are used.

Errors: a wrong Python type or array dtype raises TypeError, a wrong shape, length or value
raises ValueError; messages name the argument (and the rank, as ``x[3]``).
"""
from __future__ import annotations

from epcomm.reference._args import BF16, FP8, FP8_GROUP, FP8_MAX
from epcomm.reference.fp8 import fp8_dequantize, fp8_quantize, pack_ue8m0, unpack_ue8m0
from epcomm.reference.layout import Layout, get_dispatch_layout
from epcomm.reference.logfmt import logfmt_decode, logfmt_encode, logfmt_error_bound, logfmt_round_trip
from epcomm.reference.low_latency import (LowLatencyDispatchResult, LowLatencyHandle, low_latency_combine,
                                          low_latency_dispatch)
from epcomm.reference.masks import mask_routing
from epcomm.reference.normal import DispatchHandle, DispatchResult, combine, dispatch
from epcomm.reference.traffic import InternodeTraffic, internode_traffic

__all__ = [
    "Layout", "get_dispatch_layout",
    "DispatchHandle", "DispatchResult", "dispatch", "combine",
    "InternodeTraffic", "internode_traffic",
    "fp8_quantize", "fp8_dequantize", "pack_ue8m0", "unpack_ue8m0",
    "logfmt_encode", "logfmt_decode", "logfmt_round_trip", "logfmt_error_bound",
    "LowLatencyHandle", "LowLatencyDispatchResult", "low_latency_dispatch", "low_latency_combine",
    "mask_routing",
    "BF16", "FP8", "FP8_MAX", "FP8_GROUP",
]
