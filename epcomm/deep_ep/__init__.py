"""A drop-in for DeepEP V1: ``import epcomm.deep_ep as deep_ep`` in place of ``import deep_ep``.

The names code written for DeepEP V1 imports: :class:`Buffer` (normal and low-latency modes,
DeepEP's argument names, defaults, order and return arities), :class:`Config` (its size hints
by DeepEP's formulas), :class:`EventOverlap` and :class:`EventHandle` (also under
``epcomm.deep_ep.utils``, DeepEP's path for them), and ``topk_idx_t`` (torch.int64).  Like
DeepEP, it takes torch tensors only; :class:`epcomm.Buffer` is the framework-neutral API
underneath.  What still differs from DeepEP is listed in the README ("Porting from DeepEP").

Numerics: the drop-in's Buffer runs with ``numerics="deepep"``: DeepEP V1's FP8 scale arithmetic
(``amax * (1 / 448)``), its low-latency combine order (one FMA per row, top-k order) and its
normal combine's bias order, so results match DeepEP's bit for bit where its arithmetic is
specified (LogFMT follows DeepEP's format, not its approximate instructions).

Importing this package loads torch (DeepEP's API is torch's) but touches no GPU.
"""
from __future__ import annotations

import torch

from epcomm.deep_ep.buffer import Buffer
from epcomm.deep_ep.config import Config
from epcomm.deep_ep.event import EventHandle, EventOverlap

# DeepEP's ``deep_ep.topk_idx_t``: the dtype of expert indices (int64 in DeepEP's default build).
topk_idx_t = torch.int64

__all__ = ["Buffer", "Config", "EventOverlap", "EventHandle", "topk_idx_t"]
