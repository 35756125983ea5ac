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


# The arrays of a dispatch its combine reads, as ``LowLatencyHandle.refs`` names them.
COMBINE_REFS = ("count", "range", "src_info", "src_k", "tok_rows", "tok_meta")


class SlotOwner:
    """Stands for a slot's results in a handle over a caller's arrays: which low-latency engine
    made them (what its combine checks, ``refs["keep"].owner``)."""
    __slots__ = ("owner",)

    def __init__(self, serial: int):
        self.owner = serial


def handle_over(serial: int, sizes: LowLatencyHandle, refs: dict, generation, topk=None) -> LowLatencyHandle:
    """A handle of the engine ``serial`` over a caller's arrays (no copies): ``sizes``' slot and
    sizes, ``refs`` (TensorRef by the names of :data:`COMBINE_REFS`) for the arrays, and
    ``generation`` (None: the caller orders the combine after its dispatch, as a compiled
    program's data dependencies do).  Keeps no array beyond what ``refs`` holds."""
    missing = [k for k in COMBINE_REFS if k not in refs]
    if missing:
        raise ValueError(f"handle: arrays {missing} missing")
    return LowLatencyHandle(sizes.slot, generation, sizes.framework, sizes.num_max_tokens, sizes.hidden,
                            sizes.num_experts, sizes.num_topk, sizes.num_tokens, refs["src_info"].obj,
                            refs["range"].obj, refs=dict(refs, keep=SlotOwner(serial), topk=topk))


class _Results:
    """The packed outputs of one dispatch slot, in one framework, for one shape."""

    # The arrays, in the order of specs() (scales absent without FP8).
    NAMES = ("x", "scales", "count", "src_info", "layout_range", "src_k", "tok_rows", "tok_meta")

    def __init__(self, st, fw: str, T: int, H: int, E: int, fp8: bool, ue8m0: bool):
        self.key = (fw, T, H, E, fp8, ue8m0)
        self.owner = st.serial  # handles carry this object: which Buffer made them
        spec = self.specs(st.num_ranks, T, H, E, fp8, ue8m0)
        for name in self.NAMES:
            setattr(self, name, st.empty(fw, *spec[name], name=name) if name in spec else None)
        self.fresh = True
        self.fw = fw
        self._views = None

    @staticmethod
    def specs(R: int, T: int, H: int, E: int, fp8: bool, ue8m0: bool) -> dict:
        """name -> (shape, dtype) of a slot's arrays for R ranks: ``x`` [L, R*T, H]; FP8 ``scales``
        in memory [L, G, R*T] (column-major in the last two dims of the logical [L, R*T, G]; UE8M0:
        int32 words of 4 exponents, [L, ceil(G/4), R*T]); ``count`` [L]; ``src_info`` and ``src_k``
        [L, R*T]; ``layout_range`` [L, R, 2]; and for the combine (not returned) ``tok_rows``
        [R*T, MAX_TOPK], each source token's packed rows by k, and ``tok_meta`` int64 [R*T], the
        mask of its k on this rank with the dispatch's tag (zeroed before the first dispatch into
        them: no stale entry can match)."""
        L, RT, G = E // R, R * T, H // 128
        spec = {"x": ((L, RT, H), "float8_e4m3fn" if fp8 else "bfloat16")}
        if fp8:
            spec["scales"] = ((L, (G + 3) // 4, RT), "int32") if ue8m0 else ((L, G, RT), "float32")
        spec.update(count=((L,), "int32"), src_info=((L, RT), "int32"), layout_range=((L, R, 2), "int32"),
                    src_k=((L, RT), "int32"), tok_rows=((RT, K.MAX_TOPK), "int32"), tok_meta=((RT,), "int64"))
        return spec

    def drop_payload(self) -> None:
        """Forget ``x`` and its scales (and the views made of them): for a caller's outputs,
        which a handle kept past the call (epcomm.torch_ops' registry) must not hold alive."""
        self.x = self.scales = None
        self._views = None

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
        """Caller-framework arrays (x, scales, count, src_info, layout_range), made once.  JAX
        arrays are made after the kernel was queued (every dispatch: new storage), so JAX's
        stream is ordered after it."""
        v = self._views
        if v is None:
            v = self._make_views(stream)
            if self.fw != "jax":
                self._views = v
        return v


def _check_hook_framework(return_recv_hook: bool, fw: str) -> None:
    if return_recv_hook and fw == "jax":
        raise ValueError("return_recv_hook=True with JAX arrays: JAX has no stream that could be ordered "
                         "after the hook's receive, so its outputs would be read before they are written; "
                         "use the default (one call) or async_finish=True")


def result_specs(R: int, T: int, H: int, E: int, fp8: bool, ue8m0: bool) -> dict:
    """name -> (shape, dtype) of the arrays a low-latency dispatch writes (what a caller supplying
    its own outputs allocates): :meth:`_Results.specs`."""
    return _Results.specs(R, T, H, E, fp8, ue8m0)
