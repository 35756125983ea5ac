"""Program order for epcomm's collectives in compiled programs.

Every rank must issue the collectives in the same order, and a compiler orders operations by
their data only: Inductor places two independent ones by buffer sizes, which differ between
ranks.  So in a traced program each collective operation takes its device's order token (int32
[1], never read) and is followed by ``epcomm::order_after``, which declares the token written
after the collective's result; the next collective reads the written token.  The program's
collectives (forward and backward graphs alike) form one chain of data dependencies, which
every rank schedules the same way, and which ties collectives on different Buffers too.

Eager calls pass no token (None) and add no operation: they run in program order anyway.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import unset_fake_temporarily

_TOKENS: dict[tuple[str, int], Tensor] = {}


# Dynamo runs this at trace time (also when a device's first collective is compiled) and makes
# the token an attribute of the graph: a static input, which CUDA graph trees let a graph
# mutate (a mutated non-static input would cost the low-latency pair its CUDA graph).
@torch.compiler.assume_constant_result
def _device_token(device_type: str, index: int) -> Tensor:
    key = (device_type, index)
    t = _TOKENS.get(key)
    if t is None:
        device = torch.device(device_type, index) if index >= 0 else torch.device(device_type)
        # A plain tensor, whatever the tracer's modes: it outlives them.
        with unset_fake_temporarily(), torch.inference_mode(False), torch.no_grad():
            t = _TOKENS[key] = torch.empty(1, dtype=torch.int32, device=device)
    return t


def order_token(x: Tensor) -> Optional[Tensor]:
    """The order token for a collective on ``x``'s device: in a program Dynamo traces the
    device's (made at its first use and kept for the process), else None."""
    # Dynamo's tracing only: AOTAutograd also traces (the backward of a collective called
    # without a token, torch.ops.epcomm.* directly), with fake tensors, which a real token
    # cannot join; compiled autograd's backward is traced by Dynamo.
    if not torch.compiler.is_dynamo_compiling():
        return None
    d = x.device
    return _device_token(d.type, -1 if d.index is None else d.index)


@torch.library.custom_op("epcomm::order_after", mutates_args={"order"})
def order_after_op(order: Tensor, after: Tensor) -> None:
    """Declares ``order`` written after ``after`` was made; does nothing."""


@order_after_op.register_fake
def _order_after_fake(order, after):
    return None


def in_order(op, order: Optional[Tensor], *args):
    """``op(*args, order)``; with a token, the token then written after its (first) result, so
    the next collective that takes the token follows this one."""
    out = op(*args, order)
    if order is not None:
        order_after_op(order, out if isinstance(out, Tensor) else out[0])
    return out
