"""DeepEP V1's ``deep_ep.utils`` import path for its event classes (``from deep_ep.utils import
EventHandle, EventOverlap``, as Megatron-LM writes it)."""
from __future__ import annotations

from epcomm.deep_ep.event import EventHandle, EventOverlap

__all__ = ["EventHandle", "EventOverlap"]
