"""``epcomm plan``: bytes per GPU over the network and NVLink, lower-bound times and receive sizes
of an expert-parallel dispatch and combine across nodes, with epcomm's hierarchical route and with
a flat all-to-all, counted exactly from a seeded routing (CPU only: NumPy).

``counting.py``: the routes' row counts; ``model.py``: ``plan()`` and the ``Plan`` it returns;
``report.py``: the printed tables and the subcommand."""
from __future__ import annotations

from epcomm.tools.plan.counting import RowCounts, count_rows, receive_bound_rows
from epcomm.tools.plan.model import Buffers, LinkBytes, Plan, ReceiveSize, Traffic, plan, row_bytes
from epcomm.tools.plan.report import format_table, main

__all__ = ["plan", "Plan", "Traffic", "LinkBytes", "Buffers", "ReceiveSize", "format_table", "main",
           "count_rows", "RowCounts", "receive_bound_rows", "row_bytes"]
