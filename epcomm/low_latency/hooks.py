"""The receive hook of a low-latency call split in two (``return_recv_hook=True``)."""
from __future__ import annotations

from epcomm.errors import BufferStateError
from epcomm.kernels import low_latency as K
from epcomm.runtime import driver


def receive_hook(st, op: str, slot: int, mod, kernel: str, blocks: int, stream: int, p, smem: int, fw: str,
                 keep=()):
    """A function that launches the receive half (``kernel`` of ``mod``) of the ``op`` call
    ("dispatch" or "combine") on the stream of its send, then orders the caller's current stream
    after it.  It raises BufferStateError once the Buffer is destroyed or when called twice (also
    once a later call of the same slot is pending: its receive would take that call's messages).
    Made right after the send's launch (``st.hook_pending``), whose pending entry it keeps.
    ``keep``: arrays the receive reads (kept alive by the hook until it is dropped)."""
    mine = st.pending(op)[slot]  # this call's entry (a new object per call)

    def hook():
        """Launch the receive half of the call (on the stream of its send)."""
        if st.ctx.destroyed:
            raise BufferStateError(f"low_latency_{op} receive hook: the Buffer was destroyed")
        if st.pending(op)[slot] is not mine:
            raise BufferStateError(f"this {op}'s receive hook was already called")
        with driver.on_device(st.device_id):
            K.launch_half(mod, kernel, blocks, stream, p, smem)
            st._order_caller_after(fw, stream)
        st.hook_called(op, slot)

    hook.keep = keep
    return hook
