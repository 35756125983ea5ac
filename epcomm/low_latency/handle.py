"""Low-latency handles and the double-buffered results of a dispatch slot."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from epcomm import interop
from epcomm.jit.launch import launch_args
from epcomm.kernels import low_latency as K

SERIALS = itertools.count(1)


class _Plan:
    """A prepared steady-state launch (fast path): its params (only the pointers change per
    call), kernel, grid and argument array, and for a dispatch the views it returns."""
    __slots__ = ("p", "fn", "grid", "smem", "args", "out")

    def __init__(self, p, fn, grid, smem, out=None):
        self.p, self.fn, self.grid, self.smem, self.out = p, fn, grid, smem, out
        self.args = launch_args(p)


@dataclass(eq=False)
class LowLatencyHandle:
    """Route of one low-latency dispatch, for its combine.

    ``src_info`` (int32 [L, R*T]): source token index of each packed row; ``layout_range``
    (int32 [L, R, 2]): (begin, count) of the rows from each source rank inside each local expert.
    Both are views of the buffer's double-buffered results of ``slot``: they stay valid until the
    second next dispatch (the combine checks this and raises if they were overwritten).
    """

    slot: int
    generation: int
    framework: str
    num_max_tokens: int
    hidden: int
    num_experts: int
    num_topk: int
    num_tokens: int
    src_info: object
    layout_range: object
    refs: dict = field(repr=False, default_factory=dict)


class _Results:
    """The packed outputs of one dispatch slot, in one framework, for one shape."""

    def __init__(self, st, fw: str, T: int, H: int, E: int, fp8: bool, ue8m0: bool):
        R = st.num_ranks
        L = E // R
        RT = R * T
        G = H // 128
        self.key = (fw, T, H, E, fp8, ue8m0)
        self.owner = st.serial  # handles carry this object: which Buffer made them
        mk = st.empty
        self.x = mk(fw, (L, RT, H), "float8_e4m3fn" if fp8 else "bfloat16")
        self.scales = None
        if fp8:
            if ue8m0:
                nw = (G + 3) // 4
                self.scales = mk(fw, (L, nw, RT), "int32")
            else:
                self.scales = mk(fw, (L, G, RT), "float32")
        self.count = mk(fw, (L,), "int32")
        self.src_info = mk(fw, (L, RT), "int32")
        self.layout_range = mk(fw, (L, R, 2), "int32")
        self.src_k = mk(fw, (L, RT), "int32")
        # For the combine (not returned): each source token's packed rows by k, and the mask of
        # its k on this rank with the dispatch's tag (zeroed once: no stale entry can match).
        self.tok_rows = mk(fw, (RT, K.MAX_TOPK), "int32")
        self.tok_meta = mk(fw, (RT,), "int64")
        self.fresh = True
        self.fw = fw
        self._views = None if fw == "jax" else self._make_views(None)

    def _make_views(self, stream):
        fw = self.fw
        fin = lambda o: interop.finish(fw, o[0], stream)  # noqa: E731
        x = fin(self.x)
        scales = None
        if self.scales is not None:
            s = fin(self.scales)
            # Column-major in the last two dims: logical [L, R*T, G], memory [L][G][R*T].
            scales = interop.swap_last_two(fw, s)
        return x, scales, fin(self.count), fin(self.src_info), fin(self.layout_range)

    def views(self, stream):
        """Caller-framework arrays (x, scales, count, src_info, layout_range).  JAX arrays are
        made after the kernel was queued, so JAX's stream is ordered after it."""
        return self._views if self._views is not None else self._make_views(stream)


def _check_hook_framework(return_recv_hook: bool, fw: str) -> None:
    if return_recv_hook and fw == "jax":
        raise ValueError("return_recv_hook=True with JAX arrays: JAX has no stream that could be ordered "
                         "after the hook's receive, so its outputs would be read before they are written; "
                         "use the default (one call) or async_finish=True")


