"""The host check of expert indices: one copy of a device index array to the host (one device
synchronisation), then :func:`epcomm.validate.check_index_values` there."""
from __future__ import annotations

from epcomm import envs
from epcomm.interop.host import to_host
from epcomm.validate import check_index_values


def check_topk_indices(obj, framework: str, num_experts: int, name: str = "topk_idx",
                       capturing: bool = False, unique: bool = False, previous_event=None):
    """Raise ValueError if an index is outside [-1, num_experts); return the host copy the
    check read (a NumPy array), or None when the check did not run.

    With ``unique``, also raise if a row lists the same expert twice (the low-latency kernels
    send a token once per expert and would garble its combine).  Reading the values costs a
    device synchronisation, so it runs only when EPCOMM_CHECK_INDICES is on (the default) and the
    stream is not being captured; kernels still check the range on the device and report through
    the buffer's error record.  ``previous_event`` (an EventOverlap): the host first waits for
    it, since the indices may be written on a stream that only that event orders (the values
    are read through the framework's current stream, which does not wait for it).  A compiled
    program's buffers (framework ``"xla"``) are never read on the host.
    """
    if capturing or framework == "xla" or not envs.CHECK_INDICES.get():
        return None
    if previous_event is not None:
        previous_event.synchronize()
    # One copy to the host (one device sync), then every check there: cheaper than a sync per
    # reduction, and the indices are small (N x K).
    a = to_host(obj, framework)
    check_index_values(a, num_experts, name, unique=unique)
    return a
