"""The drop-in ``Buffer``: DeepEP V1's ``deep_ep.Buffer`` (names, defaults, argument order, return
arities) on :class:`epcomm.Buffer`.

Signatures follow DeepEP V1's last release (``deep_ep/buffer.py``, the release before DeepEP
moved it to ``deep_ep/buffers/legacy.py`` and dropped ``use_fabric`` from the constructor).
Every constructor argument is accepted; those without a meaning in epcomm are checked and have
a documented effect (see :class:`Buffer`).  Normal-mode calls route to epcomm's intranode or
internode engine as the Buffer spans one or several nodes, as DeepEP's ``dispatch`` routes to
its ``internode_dispatch``; the handles are DeepEP's tuples (:mod:`epcomm.deep_ep.handles`).
"""
from __future__ import annotations

import torch

from epcomm.buffer import Buffer as NativeBuffer
from epcomm.deep_ep import config as cfg
from epcomm.deep_ep.event import EventHandle, EventOverlap, adopt
from epcomm.deep_ep.handles import IntranodeHandle, InternodeHandle, native_of
from epcomm.deep_ep.low_latency import LowLatencyCalls
from epcomm.errors import BufferStateError
from epcomm.validate import check_bool, check_int


def _check_torch(x, name: str = "x") -> None:
    t = x[0] if isinstance(x, (tuple, list)) and x else x
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: epcomm.deep_ep takes torch tensors, as DeepEP does, got {type(t).__name__} "
                        f"(epcomm.Buffer takes CuPy and JAX arrays too)")


class Buffer(LowLatencyCalls):
    """DeepEP's communication buffer, created collectively by every rank of ``group``.

    Args (DeepEP V1's, in its order):
        group: a torch.distributed ProcessGroup (or any group epcomm accepts:
            :func:`epcomm.as_group`); None takes ``comm``.
        num_nvl_bytes: NVLink buffer bytes (normal mode), e.g. from
            :meth:`Config.get_nvl_buffer_size_hint`.  epcomm keeps a whole dispatch per peer
            region, so a size from DeepEP's hint caps the tokens of one dispatch (a larger one
            raises ValueError naming the size it needs).
        num_rdma_bytes: symmetric-heap bytes for the low-latency mode
            (:meth:`get_low_latency_rdma_size_hint`) and the normal mode across nodes.
        low_latency_mode: create the low-latency state.
        num_qps_per_rank: an int >= 1 (TypeError / ValueError otherwise).  No effect: it sets
            DeepEP's NVSHMEM IBGDA queue pairs; epcomm leaves NVSHMEM's transport settings alone.
        allow_nvlink_for_low_latency_mode: True (default): low-latency messages to NVLink peers
            are stores through peer pointers.  False (DeepEP: NVSHMEM puts only) raises
            NotImplementedError when the Buffer has an NVSHMEM part (``low_latency_mode`` or
            ``num_rdma_bytes > 0``): epcomm has no per-Buffer switch for it, only the
            process-wide EPCOMM_LL_FORCE_NVSHMEM_PUT=1, read when a Buffer is created.
        allow_mnnvl, use_fabric: bools; no effect: epcomm maps NVLink peers with CUDA IPC within a
            host and uses its internode path across hosts.
        explicitly_destroy: False: the buffer is released at interpreter exit (epcomm never
            frees it on garbage collection, where a peer could still write into it);
            :meth:`destroy` raises, as in DeepEP.  True: call :meth:`destroy` (collective) to
            release it earlier; it is released at exit otherwise.
        enable_shrink: a bool: keep a rank mask (:class:`epcomm.Buffer`'s shrink mode, in both
            modes), read and set with ``low_latency_*_mask_buffer``.
        comm: an mpi4py communicator, used when ``group`` is None.

    Every argument is checked (TypeError / ValueError, NotImplementedError as above) before any
    GPU work; then :class:`epcomm.Buffer` is created (its errors: sizes, topology, peer mapping).

    Attributes (DeepEP's): ``num_sms`` (class-wide, :meth:`set_num_sms`), ``rank``,
    ``group_size``, ``group`` (as given: ``comm`` when ``group`` is None), ``num_nvl_bytes``,
    ``num_rdma_bytes``, ``low_latency_mode``, ``explicitly_destroy``, ``enable_shrink``;
    ``native`` is the :class:`epcomm.Buffer` (DeepEP's ``runtime``, its C++ object, has no
    counterpart).
    """

    num_sms: int = 20

    def __init__(self, group, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True,
                 allow_mnnvl: bool = False, use_fabric: bool = False, explicitly_destroy: bool = False,
                 enable_shrink: bool = False, comm=None) -> None:
        if group is None and comm is None:
            raise ValueError("Either 'group' or 'comm' must be provided.")
        num_nvl_bytes = check_int("num_nvl_bytes", num_nvl_bytes, lo=0)
        num_rdma_bytes = check_int("num_rdma_bytes", num_rdma_bytes, lo=0)
        low_latency_mode = check_bool("low_latency_mode", low_latency_mode)
        check_int("num_qps_per_rank", num_qps_per_rank, lo=1)
        allow_nvlink = check_bool("allow_nvlink_for_low_latency_mode", allow_nvlink_for_low_latency_mode)
        check_bool("allow_mnnvl", allow_mnnvl)
        check_bool("use_fabric", use_fabric)
        explicitly_destroy = check_bool("explicitly_destroy", explicitly_destroy)
        enable_shrink = check_bool("enable_shrink", enable_shrink)
        if not allow_nvlink and (low_latency_mode or num_rdma_bytes > 0):
            raise NotImplementedError(
                "allow_nvlink_for_low_latency_mode=False: epcomm has no per-Buffer switch to send low-latency "
                "messages to NVLink peers by NVSHMEM puts; set EPCOMM_LL_FORCE_NVSHMEM_PUT=1 in the environment of "
                "every rank before creating the Buffer (it applies to every Buffer of the process) and pass True")
        # DeepEP's arithmetic (FP8 scales, combine orders), so results match logs made with DeepEP.
        native = NativeBuffer(group if group is not None else comm, num_nvl_bytes, num_rdma_bytes,
                              low_latency_mode=low_latency_mode, numerics="deepep", enable_shrink=enable_shrink)
        self._attach(native, group if group is not None else comm, num_nvl_bytes, num_rdma_bytes, low_latency_mode,
                     explicitly_destroy, enable_shrink)

    @classmethod
    def _around(cls, native, group=None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                low_latency_mode: bool = False, explicitly_destroy: bool = False,
                enable_shrink: bool = False) -> "Buffer":
        """A drop-in Buffer around an epcomm Buffer already made (not collective): how tests run
        the call paths on a stand-in."""
        b = object.__new__(cls)
        b._attach(native, group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, explicitly_destroy, enable_shrink)
        return b

    def _attach(self, native, group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, explicitly_destroy,
                enable_shrink) -> None:
        self.native = native
        self.group = group
        self.rank, self.group_size = native.rank, native.num_ranks
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy, self.enable_shrink = explicitly_destroy, enable_shrink
        self._handle_kind = InternodeHandle if native.internode else IntranodeHandle
        self._configs: dict = {}   # (op, deep_ep Config or SM count) -> the epcomm Config it runs with
        self._comm_stream = None

    def destroy(self) -> None:
        """Release the buffer (collective: every rank calls it).  Raises BufferStateError unless
        the Buffer was created with ``explicitly_destroy=True`` (DeepEP asserts it)."""
        if not self.explicitly_destroy:
            raise BufferStateError("destroy: the Buffer was created with explicitly_destroy=False (it is released "
                                   "at exit); pass explicitly_destroy=True to release it with destroy()")
        self.native.destroy()

    # ---- static helpers ------------------------------------------------------------------------
    @staticmethod
    def is_sm90_compiled() -> bool:
        """True: epcomm compiles its kernels at run time for the GPU in use, so the SM90 code
        paths (FP8, TMA) exist wherever the GPU has them (DeepEP: whether its build has them)."""
        return True

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set the SMs of every Buffer's normal-mode calls made without a config (class-wide, as in
        DeepEP).  Raises TypeError for a non-int, ValueError for an odd count (DeepEP's rule) or
        one below 2; a count above the GPU's SMs raises at the call."""
        n = check_int("new_num_sms", new_num_sms, lo=2)
        if n % 2:
            raise ValueError(f"new_num_sms={n}: the SM count must be even")
        Buffer.num_sms = n

    @staticmethod
    def capture() -> EventOverlap:
        """An EventOverlap of an event recorded on torch's current stream now (for
        ``previous_event``)."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """``num_rdma_bytes`` epcomm's low-latency calls of up to these sizes need (its own heap
        layout: less than DeepEP's hint for the same shape).  Raises TypeError/ValueError for
        sizes the kernels cannot run."""
        return NativeBuffer.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks,
                                                           num_experts)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> cfg.Config:
        """DeepEP's recommended dispatch Config for ``num_ranks`` (its table, ``num_sms`` =
        ``Buffer.num_sms``).  Raises ValueError for a rank count the table lacks (2, 4, 8, 16,
        24, 32, 48, 64, 96, 128, 144, 160); the calls themselves run any rank count."""
        return cfg.recommended(cfg.DISPATCH_TABLE, num_ranks, Buffer.num_sms, "dispatch")

    @staticmethod
    def get_combine_config(num_ranks: int) -> cfg.Config:
        """DeepEP's recommended combine Config for ``num_ranks`` (as :meth:`get_dispatch_config`)."""
        return cfg.recommended(cfg.COMBINE_TABLE, num_ranks, Buffer.num_sms, "combine")

    # ---- streams and memory ----------------------------------------------------------------
    def get_comm_stream(self) -> torch.cuda.Stream:
        """The stream the normal-mode kernels run on, as a ``torch.cuda.Stream`` (an
        ``ExternalStream`` around epcomm's stream; the same object on every call)."""
        if self._comm_stream is None:
            self._comm_stream = torch.cuda.ExternalStream(self.native.comm_stream,
                                                          device=torch.device("cuda", self.native.device_id))
        return self._comm_stream

    def get_local_buffer_tensor(self, dtype, size=None, offset: int = 0, use_rdma_buffer: bool = False):
        """DeepEP's raw view of its buffers: raises NotImplementedError.  epcomm does not expose
        its NVLink buffer or symmetric heap: their layout (flags, mailboxes, staging regions) is
        internal, and a write into them would corrupt later calls.  The low-latency combine's
        zero-copy input is :meth:`get_next_low_latency_combine_buffer`."""
        raise NotImplementedError("get_local_buffer_tensor: epcomm does not expose its NVLink buffer or symmetric "
                                  "heap (their layout is internal; writes would corrupt later calls); for a zero-copy "
                                  "low-latency combine use get_next_low_latency_combine_buffer")

    # ---- normal mode ---------------------------------------------------------------------------
    def _config(self, config, op: str):
        """The epcomm Config of one call (``op``: "dispatch" or "combine"), memoised."""
        key = (op, config if config is not None else Buffer.num_sms)
        try:
            return self._configs[key]
        except (KeyError, TypeError):  # TypeError: an unhashable config, which native_config names
            pass
        default = self.native.get_dispatch_config() if op == "dispatch" else self.native.get_combine_config()
        c = self._configs[key] = cfg.native_config(config, default, Buffer.num_sms)
        return c

    def get_dispatch_layout(self, topk_idx, num_experts: int, previous_event=None, async_finish: bool = False,
                            allocate_on_comm_stream: bool = False):
        """Routing counts of this rank's tokens: DeepEP's 5-tuple ``(num_tokens_per_rank int32 [R],
        num_tokens_per_rdma_rank int32 [nodes] or None inside one node, num_tokens_per_expert
        int32 [E], is_token_in_rank bool [N, R], event)``.  ``topk_idx``: int64 [N, K] (-1: none).
        Raises TypeError/ValueError before any launch (see :meth:`epcomm.Buffer.get_dispatch_layout`)."""
        _check_torch(topk_idx, "topk_idx")
        *counts, event = self.native.get_dispatch_layout(topk_idx, num_experts, previous_event, async_finish,
                                                         allocate_on_comm_stream)
        return (*counts, adopt(event))

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config=None, previous_event=None,
                 async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Send every token once to each rank holding one of its experts (intranode or across
        nodes, as the Buffer spans).

        Args as DeepEP's: ``x`` bf16 [N, H] or an FP8 pair (e4m3 [N, H], float32 scales
        [N, H/128]); ``topk_idx`` int64 [N, K]; ``topk_weights`` float32 [N, K]; the counts from
        :meth:`get_dispatch_layout` (computed here when omitted); ``config`` a :class:`Config`
        (only ``num_sms`` is used: :mod:`epcomm.deep_ep.config`) or None (``Buffer.num_sms``).
        With ``handle`` (a previous dispatch's): repeat its route; ``topk_idx`` and
        ``topk_weights`` must be None (ValueError) and the other routing arguments and
        ``expert_alignment`` are ignored, as in DeepEP.

        Returns DeepEP's 6-tuple ``(recv_x, recv_topk_idx, recv_topk_weights,
        num_recv_tokens_per_expert_list, handle, event)``; ``handle`` is an
        :class:`~epcomm.deep_ep.handles.IntranodeHandle` (6 elements) or, across nodes, an
        :class:`~epcomm.deep_ep.handles.InternodeHandle` (10).  A cached dispatch returns
        ``(recv_x, None, None, None, None, event)`` as DeepEP does.  Raises what
        :meth:`epcomm.Buffer.dispatch` raises (e.g. ValueError naming the ``num_nvl_bytes`` a
        dispatch too large for the buffer needs).
        """
        _check_torch(x)
        c = self._config(config, "dispatch")
        if handle is not None:
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("dispatch: with a handle, topk_idx and topk_weights must be None (the handle holds "
                                 "the route)")
            recv_x, *_, event = self.native.dispatch(x, native_of(handle, self._handle_kind),
                                                     num_worst_tokens=num_worst_tokens, config=c,
                                                     previous_event=previous_event, async_finish=async_finish,
                                                     allocate_on_comm_stream=allocate_on_comm_stream)
            return recv_x, None, None, None, None, adopt(event)
        recv_x, recv_idx, recv_w, counts, native, event = self.native.dispatch(
            x, None, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert,
            topk_idx, topk_weights, expert_alignment, num_worst_tokens, c, previous_event, async_finish,
            allocate_on_comm_stream)
        return recv_x, recv_idx, recv_w, counts, self._handle_kind(native), adopt(event)

    def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Reverse a dispatch: every token gets the **unweighted** sum of its rows.

        Args as DeepEP's: ``x`` bf16 [rows, H] in the dispatch's receive order; ``handle`` the
        dispatch's (or a tuple of its elements); ``topk_weights`` None or float32 [rows, K];
        ``bias`` None, one bf16 [N, H] tensor or a pair; ``config`` as in :meth:`dispatch`.

        Returns DeepEP's 3-tuple ``(combined_x bf16 [N, H], combined_topk_weights or None,
        event)``.  Raises TypeError for a handle of another kind, and what
        :meth:`epcomm.Buffer.combine` raises.
        """
        _check_torch(x)
        out, weights, event = self.native.combine(x, native_of(handle, self._handle_kind), topk_weights, bias,
                                                  self._config(config, "combine"), previous_event, async_finish,
                                                  allocate_on_comm_stream)
        return out, weights, adopt(event)

    def _require_internode(self, what: str) -> None:
        if self._handle_kind is not InternodeHandle:
            raise ValueError(f"{what}: this Buffer's normal mode runs inside one node; call "
                             f"{what.replace('internode_', '')} (DeepEP routes there too)")

    def internode_dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                           is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                           expert_alignment: int = 1, num_worst_tokens: int = 0, config=None, previous_event=None,
                           async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """DeepEP's internode dispatch: :meth:`dispatch` on a Buffer whose normal mode spans nodes
        (ValueError on one inside a node, before any work)."""
        self._require_internode("internode_dispatch")
        return self.dispatch(x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                             num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens, config,
                             previous_event, async_finish, allocate_on_comm_stream)

    def internode_combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None,
                          async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """DeepEP's internode combine: :meth:`combine` on a Buffer whose normal mode spans nodes
        (ValueError otherwise)."""
        self._require_internode("internode_combine")
        return self.combine(x, handle, topk_weights, bias, config, previous_event, async_finish,
                            allocate_on_comm_stream)
