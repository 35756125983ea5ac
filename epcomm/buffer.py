"""The communication buffer: normal (high-throughput) and low-latency expert-parallel
dispatch/combine.

``Buffer`` is created collectively by every rank of a group (one process per GPU).  It finds the
group's nodes (:mod:`epcomm.runtime.topology`), builds the mode engines and routes calls to
them: the normal mode inside one node (:mod:`epcomm.normal`) uses an NVLink buffer
(``num_nvl_bytes``) mapped into every peer with CUDA IPC; across nodes (:mod:`epcomm.internode`)
it uses the NVSHMEM symmetric heap (``num_rdma_bytes + num_nvl_bytes``); the low-latency mode
(:mod:`epcomm.low_latency`) uses the NVSHMEM symmetric heap.  What both share (device, streams,
error record, call plumbing) is a :class:`epcomm.context.CommContext`.
"""
from __future__ import annotations

import atexit
import warnings
import weakref

from epcomm import envs, internode, normal
from epcomm.config import Config, default_combine_config, default_dispatch_config
from epcomm.context import CommContext
from epcomm.errors import BufferStateError
from epcomm.internode import InternodeState
from epcomm.kernels import internode as K_inter
from epcomm.kernels import intranode as K_intra
from epcomm.kernels import low_latency as K_ll
from epcomm.low_latency import LowLatencyState
from epcomm.normal import DispatchHandle, NvlinkState
from epcomm.runtime import driver
from epcomm.runtime import event as event_mod
from epcomm.runtime import nvshmem as nvr
from epcomm.runtime.event import EventOverlap
from epcomm.runtime.group import as_group
from epcomm.runtime.rankmask import RankMask
from epcomm.runtime.topology import discover
from epcomm.validate import check_bool, check_hidden_size, check_int, check_numerics

__all__ = ["Buffer", "DispatchHandle", "find_buffer"]

_LIVE_BUFFERS: "weakref.WeakSet[Buffer]" = weakref.WeakSet()


# What destroy() publishes when it meets its group (Buffer._meet_to_destroy).
_DESTROY_TAG = b"epcomm.Buffer.destroy"


def find_buffer(serial: int) -> "Buffer | None":
    """The live (not destroyed) Buffer whose ``ctx.serial`` is ``serial``, else None: how code
    that can pass only plain numbers (a compiled program's operations) names a Buffer."""
    for b in list(_LIVE_BUFFERS):
        if b.ctx.serial == serial:
            return b
    return None


@atexit.register
def _destroy_all() -> None:  # pragma: no cover - exercised at interpreter exit
    for b in list(_LIVE_BUFFERS):
        try:
            b.destroy()
        except Exception:
            pass


class Buffer:
    """Expert-parallel communication buffer, created collectively by every rank of ``group``.

    Args:
        group: a torch.distributed group, an mpi4py communicator, ``"jax"`` (JAX's distributed
            runtime), any object with ``rank``/``size``/``allgather_bytes``/``barrier``, or None
            for the initialised torch.distributed default group.  Used only to exchange handles.
        num_nvl_bytes: bytes of NVLink buffer per rank for the normal mode (0: no normal mode).
            :meth:`get_nvl_buffer_size_hint` computes what a token count needs; across nodes
            it holds the rows a combine stages (:meth:`get_internode_nvl_size_hint`).
        num_rdma_bytes: bytes of NVSHMEM symmetric heap per rank for the low-latency mode
            (:meth:`get_low_latency_rdma_size_hint`) and, when the group spans nodes, for the
            normal mode's network regions (:meth:`get_rdma_buffer_size_hint`); 0: none.
        low_latency_mode: create the low-latency (NVSHMEM) state.
        device: CUDA device ordinal; default: the current device, else ``rank % device_count``.
        numerics: ``"epcomm"`` (default) or ``"deepep"``: reproduce DeepEP V1's arithmetic where
            it differs from epcomm's, in every call of this Buffer: the FP8 scales of
            :meth:`low_latency_dispatch` (``amax * float32(1/448)``), the sum of
            :meth:`low_latency_combine` (fused multiply-adds in top-k order, no expert-side
            partial sums) and of :meth:`combine` (biases first; across nodes each node's part
            rounded to bf16).  docs/design.md ("Numerics") lists the source lines.  A Buffer
            setting, not a per-call one: the low-latency combine's row format depends on it, so
            every rank must use the same (the constructor checks that they do), and the prepared
            fast paths need no check per call.
        enable_shrink: keep a rank mask (shrink mode; every rank must agree).  A masked rank is
            neither sent to nor waited for (its experts receive nothing, its part of a combine
            is absent); a peer that does not arrive within EPCOMM_SHRINK_TIMEOUT_MS is masked by
            the rank that waited, which completes the call without it instead of raising
            EpcommTimeoutError.  See :meth:`update_mask`, :meth:`query_mask`,
            :meth:`clean_mask` and docs/design.md ("Rank masks").  Not across nodes
            (ValueError there).

    The group spans nodes when its ranks are on several hosts (or GPUs that cannot reach each
    other), or as declared by EPCOMM_RANKS_PER_NODE; nodes must be equal blocks of consecutive
    ranks.  Raises ValueError for bad sizes or nodes, and EpcommError if peer memory cannot be
    mapped.
    The buffer must be used by every rank with the same sequence of calls; :meth:`destroy`
    (also run at exit) releases it collectively.
    """

    def __init__(self, group=None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, *,
                 low_latency_mode: bool = False, device: int | None = None, numerics: str = "epcomm",
                 enable_shrink: bool = False):
        # The arguments first: their errors name the cause, where a group error would not.
        check_int("num_nvl_bytes", num_nvl_bytes, lo=0)
        check_int("num_rdma_bytes", num_rdma_bytes, lo=0)
        check_bool("low_latency_mode", low_latency_mode)
        check_numerics(numerics)
        enable_shrink = check_bool("enable_shrink", enable_shrink)
        if device is not None:
            check_int("device", device, lo=0)
        group = as_group(group)
        if group.size < 1:
            raise ValueError("group has no ranks")
        n_dev = driver.init()
        if device is None:
            cur = driver.current_device()
            device = cur if cur >= 0 else group.rank % max(n_dev, 1)
        check_int("device", device, lo=0, hi=n_dev - 1)
        ctx = CommContext.open(group, device)
        ctx.numerics = numerics
        ctx.shrink = enable_shrink
        self._attach(ctx)
        try:
            self._open_engines(num_nvl_bytes, num_rdma_bytes, low_latency_mode)
        except BaseException:
            # Nothing of a Buffer that never existed stays allocated (e.g. a 2 GiB NVLink buffer
            # and its peers' mappings, when the low-latency part then fails).
            ctx.destroyed = True
            with driver.on_device(device):
                self._free_local(failing=True)
            raise
        _LIVE_BUFFERS.add(self)

    @classmethod
    def _assemble(cls, ctx: CommContext, nvlink=None, low_latency=None) -> "Buffer":
        """A Buffer around engines already made (not collective, not registered for teardown at
        exit): how tests run the call paths on a fake runtime."""
        b = object.__new__(cls)
        b._attach(ctx)
        b._intra, b._ll = nvlink, low_latency
        return b

    def _attach(self, ctx: CommContext) -> None:
        self.ctx = ctx
        self.group, self.rank, self.num_ranks, self.device_id = ctx.group, ctx.rank, ctx.num_ranks, ctx.device_id
        self._serial = ctx.serial
        self._intra: NvlinkState | None = None
        self._inter: InternodeState | None = None
        self._ll: LowLatencyState | None = None
        self._dispatch_config = default_dispatch_config(self.num_ranks)
        self._combine_config = default_combine_config(self.num_ranks)

    def _open_engines(self, num_nvl_bytes: int, num_rdma_bytes: int, low_latency_mode: bool) -> None:
        """The collective part of the constructor: every rank checks that the others agree, then
        the engines are made."""
        ctx, group = self.ctx, self.group
        sizes = group.allgather_bytes(f"{num_nvl_bytes},{num_rdma_bytes},{int(low_latency_mode)},"
                                      f"{ctx.numerics},{int(ctx.shrink)}".encode())
        if len(set(sizes)) != 1:
            raise ValueError(f"every rank must create the Buffer with the same sizes, mode, numerics and "
                             f"enable_shrink; got {[s.decode() for s in sizes]} "
                             f"(num_nvl_bytes,num_rdma_bytes,low_latency_mode,numerics,enable_shrink)")
        buses = group.allgather_bytes(driver.pci_bus_id(self.device_id).encode())
        ctx.shares_gpu = len(set(buses)) != len(buses)
        if ctx.shares_gpu and not envs.SHARE_GPU.get():
            raise ValueError(f"two ranks share one GPU ({[b.decode() for b in buses]}); use one GPU per rank"
                             " (EPCOMM_SHARE_GPU=1 allows it for correctness tests)")
        ctx.topology = topo = discover(group, self.device_id)
        inter = topo.spans_nodes and num_nvl_bytes > 0
        ll = low_latency_mode or (num_rdma_bytes > 0 and not inter)
        if ll:
            LowLatencyState.check_args(self.num_ranks, num_rdma_bytes)  # before any allocation
        if inter and ctx.shrink:
            raise ValueError(f"enable_shrink=True: the group spans {topo.num_nodes} nodes, and the normal mode "
                             f"across nodes has no rank masks; use shrink mode inside one node, or the "
                             f"low-latency mode alone (num_nvl_bytes=0)")
        if inter:
            K_inter.check_topology(self.num_ranks, topo.ranks_per_node)
            if num_rdma_bytes <= 0:
                raise ValueError(f"the group spans {topo.num_nodes} nodes of {topo.ranks_per_node} ranks: the normal "
                                 f"mode needs num_rdma_bytes > 0 (see Buffer.get_rdma_buffer_size_hint)")
            heap = num_rdma_bytes + num_nvl_bytes + 4096 + (num_rdma_bytes if ll else 0)
            with driver.on_device(self.device_id):  # one heap size for both engines' allocations
                nvr.init(group, self.device_id, heap, shared_gpu=ctx.shares_gpu)
            self._inter = InternodeState(ctx, topo.ranks_per_node, num_nvl_bytes, num_rdma_bytes)
            self._dispatch_config = default_dispatch_config(self.num_ranks, topo.num_nodes)
            self._combine_config = default_combine_config(self.num_ranks, topo.num_nodes)
        elif num_nvl_bytes > 0:
            if self.num_ranks < 2:
                raise ValueError("the normal mode needs at least 2 ranks")
            if self.num_ranks > K_intra.MAX_RANKS:
                raise ValueError(f"{self.num_ranks} ranks: the NVLink normal mode supports at most "
                                 f"{K_intra.MAX_RANKS} ranks in one NVLink domain")
            self._intra = NvlinkState(ctx, num_nvl_bytes)
        if ll:
            self._ll = LowLatencyState(ctx, num_rdma_bytes)
        if ctx.shrink:
            addrs = [e.mask_addr for e in (self._intra, self._ll) if e is not None]
            ctx.mask = RankMask(self.device_id, self.rank, self.num_ranks, addrs)

    @property
    def numerics(self) -> str:
        """``"epcomm"`` or ``"deepep"``: whose arithmetic this Buffer's calls follow (see the class)."""
        return self.ctx.numerics

    @property
    def shares_gpu(self) -> bool:
        """Whether two ranks of the group share this GPU (EPCOMM_SHARE_GPU)."""
        return self.ctx.shares_gpu

    @property
    def internode(self) -> bool:
        """Whether the normal mode runs across nodes (:mod:`epcomm.internode`: the group spans
        nodes and the Buffer has ``num_nvl_bytes > 0``); its dispatches then return
        :class:`epcomm.internode.InternodeHandle` handles."""
        return self._inter is not None

    @property
    def timeout_s(self) -> float:
        """Seconds a kernel waits for a peer before it reports a timeout (EPCOMM_TIMEOUT_S)."""
        return self.ctx.timeout_s

    # ---- configuration -------------------------------------------------------------------
    @property
    def comm_stream(self) -> int:
        """Raw handle (cudaStream_t) of the stream the normal-mode kernels run on."""
        return self.ctx.stream

    def set_num_sms(self, num_sms: int) -> None:
        """Bound the SMs of normal-mode dispatch and combine (sending + receiving blocks).

        ``num_sms``: an int (NumPy ints accepted) in [2, the device's SM count]; TypeError /
        ValueError otherwise, with the configs unchanged."""
        n = self.ctx.check_sms(num_sms)
        self._dispatch_config = self._dispatch_config.with_sms(n)
        self._combine_config = self._combine_config.with_sms(n)

    def get_dispatch_config(self) -> Config:
        return self._dispatch_config

    def get_combine_config(self) -> Config:
        return self._combine_config

    def profile_stamps(self) -> dict | None:
        """Per-block stamps of the last normal-mode kernels.

        Only with ``EPCOMM_PROFILE=1`` at Buffer creation (otherwise returns None).  Returns
        ``{kernel: int64 array [blocks, 4]}`` for "notify", "send", "recv" and "combine", columns
        (start ns, end ns, SM id, SM clock cycles from start to end), globaltimer nanoseconds;
        rows of blocks that did not run are 0, and ``"host"``: the host steps of the last
        dispatch (time.time_ns()).  Synchronises the device; the stamps are cleared after
        reading so the next call's kernels start from zero.
        """
        return None if self._intra is None else self._intra.profile_stamps(self.ctx)

    @staticmethod
    def get_nvl_buffer_size_hint(hidden: int, num_ranks: int, num_max_tokens_per_rank: int,
                                 num_topk: int = 8) -> int:
        """Bytes of ``num_nvl_bytes`` needed to dispatch and combine up to
        ``num_max_tokens_per_rank`` tokens (BF16 or FP8) of ``hidden`` channels with ``num_topk``
        experts per token (0: dispatches without top-k).

        Raises TypeError for non-int arguments (NumPy ints are accepted), ValueError for
        ``hidden`` not a positive multiple of 8 (the dispatch's rule for BF16; FP8 needs
        multiples of 128), ``num_ranks`` outside [2, 72], ``num_max_tokens_per_rank`` < 1 or
        ``num_topk`` < 0."""
        hidden = check_hidden_size(check_int("hidden", hidden, lo=8), name=None)
        num_ranks = check_int("num_ranks", num_ranks, lo=2, hi=K_intra.MAX_RANKS)
        num_max_tokens_per_rank = check_int("num_max_tokens_per_rank", num_max_tokens_per_rank, lo=1)
        num_topk = check_int("num_topk", num_topk, lo=0)
        return K_intra.nvl_buffer_size_hint(hidden, num_ranks, num_max_tokens_per_rank, num_topk)

    @staticmethod
    def get_rdma_buffer_size_hint(hidden: int, num_ranks: int, num_max_tokens_per_rank: int,
                                  num_ranks_per_node: int = 8) -> int:
        """``num_rdma_bytes`` for the normal mode across nodes: dispatches of up to
        ``num_max_tokens_per_rank`` tokens of ``hidden`` channels (BF16 or FP8, top-k <= 32) and
        their combines, ``num_ranks`` ranks in nodes of ``num_ranks_per_node``.  Raises
        TypeError/ValueError for arguments the internode kernels cannot run (at least two nodes,
        at most 256 ranks and 32 per node)."""
        return K_inter.rdma_size_hint(hidden, num_ranks, num_ranks_per_node, num_max_tokens_per_rank)

    @staticmethod
    def get_internode_nvl_size_hint(hidden: int, num_max_recv_tokens: int) -> int:
        """``num_nvl_bytes`` for the normal mode across nodes: the combine stages the rows a rank
        received (up to ``num_max_recv_tokens``; the worst case is every token of every rank,
        ``num_ranks * num_max_tokens_per_rank``)."""
        return K_inter.nvl_size_hint(hidden, num_max_recv_tokens)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int,
                                       num_ranks: int, num_experts: int) -> int:
        """Symmetric-heap bytes (``num_rdma_bytes``) for low-latency calls of up to these sizes."""
        return K_ll.rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def _destroyed(self) -> bool:
        return self.ctx.destroyed

    @_destroyed.setter
    def _destroyed(self, value: bool) -> None:
        self.ctx.destroyed = value

    def check(self) -> None:
        """Raise any error a kernel recorded (timeout, overflow, bad index) since the last call."""
        self.ctx.check_usable("check")

    def synchronize(self) -> None:
        """Wait for all work on this buffer's device (low-latency kernels run on the caller's
        streams), then raise any error a kernel recorded."""
        with driver.on_device(self.device_id):
            driver.check(driver.drv().cuCtxSynchronize(), "cuCtxSynchronize")
        self.check()

    # ---- rank masks (shrink mode) ---------------------------------------------------------------
    def _mask(self, what: str) -> RankMask:
        if self.ctx.destroyed:
            raise BufferStateError(f"{what}: the Buffer was destroyed")
        if self.ctx.mask is None:
            raise BufferStateError(f"{what} needs a Buffer created with enable_shrink=True")
        return self.ctx.mask

    def update_mask(self, rank: int, masked: bool = True) -> None:
        """Mask (or, with ``masked=False``, unmask) ``rank`` on this process, between calls (it
        waits for this device's work).  Every surviving rank should make the same update before
        its next call (a rank that does not learns it in that call: see docs/design.md, "Rank
        masks").  Unmasking is for a rank that was masked while it was alive and idle, before
        any call ran with the mask; a rank that made calls while masked, or died, needs a new
        Buffer.  TypeError/ValueError for a rank outside [0, R), this process's own rank or a
        non-bool ``masked``; BufferStateError without shrink mode or after :meth:`destroy`."""
        self._mask("update_mask").update(rank, masked)

    def query_mask(self):
        """The mask: a NumPy int32 array [R], 1 for every masked rank (set by
        :meth:`update_mask`, by this rank's kernels on a timeout, or published by a peer's).
        Waits for this device's work.  BufferStateError without shrink mode or after
        :meth:`destroy`."""
        return self._mask("query_mask").query()

    def clean_mask(self) -> None:
        """Unmask every rank (between calls; the rules of :meth:`update_mask` apply)."""
        self._mask("clean_mask").clean()

    def destroy(self, group=None) -> None:
        """Release the buffer's memory.  Collective over ``group`` (default: the Buffer's own):
        its ranks meet first, so that none still writes into memory another releases.  After
        ranks died or left (shrink mode), pass a group of the survivors (the Buffer's group
        would wait EPCOMM_GROUP_TIMEOUT_S for the missing ones); a rank leaving alone passes
        ``epcomm.runtime.group.LocalGroup()`` once its peers have masked it.  The symmetric heap
        (low-latency mode) is freed only when ``group`` has every rank of the Buffer's and none
        is masked, as NVSHMEM's free waits for every PE; otherwise it stays until NVSHMEM is
        finalised.  So it stays too, with a RuntimeWarning, when a rank of ``group`` is not
        destroying at the same time (out of step after an error).  TypeError for a ``group``
        that is not a group (nothing released)."""
        if self.ctx.destroyed:
            return
        group = self.group if group is None else as_group(group)
        self.ctx.destroyed = True
        _LIVE_BUFFERS.discard(self)
        with driver.on_device(self.device_id):
            try:
                # Every stream of the device: low-latency kernels usually run on the caller's
                # streams, and a peer's still-queued one would write into memory freed below.
                driver.device_sync()
            except Exception:
                pass
            in_step = self._meet_to_destroy(group)  # no peer may still write into memory we unmap
            # A smaller group (survivors, or a rank leaving alone), or ranks not destroying it
            # with us: the ranks outside never join a collective free.
            self._free_local(failing=not in_step or group.size < self.num_ranks or self._some_masked())
            event_mod.release_finished()  # the device is idle: CuPy/JAX arrays of dropped events go

    def _meet_to_destroy(self, group) -> bool:
        """Meet ``group`` before releasing: an allgather of a tag, so the collective steps
        (NVSHMEM's free of the symmetric heap, which waits for every PE with no timeout) run only
        when every rank of ``group`` is destroying too.  False, with a RuntimeWarning, when the
        meeting failed or a rank was elsewhere (out of step after an error: its own collective
        call paired with this one); every rank that destroys receives the same tags, so all
        decide alike."""
        try:
            tags = group.allgather_bytes(_DESTROY_TAG)
        except Exception as e:
            warnings.warn(f"Buffer.destroy on rank {self.rank}: meeting the other ranks failed "
                          f"({type(e).__name__}: {e}); releasing the memory anyway, without the collective "
                          f"steps (a peer that still writes into it would fault)", RuntimeWarning, stacklevel=3)
            return False
        elsewhere = [r for r, t in enumerate(tags) if bytes(t) != _DESTROY_TAG]
        if elsewhere:
            warnings.warn(f"Buffer.destroy on rank {self.rank}: rank(s) {elsewhere} of the group are not destroying "
                          f"this Buffer now (out of step after an error?); releasing this rank's memory without "
                          f"the collective steps (the symmetric heap stays until NVSHMEM is finalised)",
                          RuntimeWarning, stacklevel=3)
            return False
        return True

    def _some_masked(self) -> bool:
        """Whether some rank is masked (then collective teardown steps cannot run)."""
        try:
            return self.ctx.mask is not None and bool(self.ctx.mask.query().any())
        except Exception:
            return True

    def _free_local(self, failing: bool = False) -> None:
        """Release what this process holds: destroy()'s end (after its barrier), and what a
        constructor that raised had made so far.  ``failing`` (a constructor that raised, or
        masked ranks): without the collective steps, the symmetric heap's free among them (see
        LowLatencyState.free)."""
        if self._intra is not None:
            self._intra.free()
            self._intra = None
        if self._inter is not None:
            self._inter.free(collective=not failing)
            self._inter = None
        if self._ll is not None:
            self._ll.free(collective=not failing)
            self._ll = None
        self.ctx.close()

    def __del__(self):  # pragma: no cover - depends on GC timing
        pass  # memory is released by destroy() or at exit; unmapping here could race a peer

    # ---- normal mode (epcomm.normal) -----------------------------------------------------------
    def get_dispatch_layout(self, topk_idx, num_experts: int, previous_event: EventOverlap | None = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Per-rank routing counts of this rank's tokens; see :func:`epcomm.get_dispatch_layout`.

        Args:
            topk_idx: int64 (or int32) [N, K] (-1 = no expert).
            num_experts: E, an int (NumPy ints accepted), a multiple of the rank count R, with
               E + R <= 12288 (the layout kernel's counters in 48 KiB of shared memory).

        Returns ``(num_tokens_per_rank int32 [R], num_tokens_per_rdma_rank, num_tokens_per_expert
        int32 [E], is_token_in_rank bool [N, R], event)``.  ``num_tokens_per_rdma_rank``: int32
        [nodes] (a token counts once per node) when the Buffer spans nodes, else None (one
        NVLink domain of up to 72 ranks is one "node" in DeepEP's terms, whatever R is).  Per-node
        counts for another partition: :func:`epcomm.get_dispatch_layout` with
        ``num_ranks_per_node``.

        Raises TypeError/ValueError before any launch (wrong dtype, shape, framework, an index
        outside [-1, E), or ``previous_event`` not an EventOverlap).
        """
        P = self._inter.rpn if self._inter is not None else None
        return normal.get_dispatch_layout(self.ctx, topk_idx, num_experts, previous_event, async_finish,
                                          allocate_on_comm_stream, ranks_per_node=P)

    def dispatch(self, x, handle: DispatchHandle | None = None, num_tokens_per_rank=None,
                 num_tokens_per_rdma_rank=None, is_token_in_rank=None, num_tokens_per_expert=None,
                 topk_idx=None, topk_weights=None, expert_alignment: int = 1, num_worst_tokens: int = 0,
                 config: Config | None = None, previous_event: EventOverlap | None = None,
                 async_finish: bool = False, allocate_on_comm_stream: bool = False, *,
                 num_experts: int | None = None):
        """Send every token once to each rank holding one of its experts (normal mode).

        Args:
            x: bf16 [N, H], or an FP8 pair ``(float8_e4m3fn [N, H], float32 scales [N, H/128])``
               whose scales may be row-major or column-major (any strides).  Every other array
               argument must be of the same framework as ``x`` (TypeError otherwise: only that
               framework's stream is ordered with the kernels).
            handle: a previous dispatch's handle (of this Buffer): repeat its route (no top-k, no
               count exchange, no CPU synchronisation; used for the backward of combine).  With a
               handle, every routing argument (``num_tokens_per_rank``,
               ``num_tokens_per_rdma_rank``, ``is_token_in_rank``, ``num_tokens_per_expert``,
               ``topk_idx``, ``topk_weights``, ``num_experts``) must be None and
               ``expert_alignment`` 1: the handle holds the route (ValueError otherwise).
            num_tokens_per_rank: None or int32 [R], from :meth:`get_dispatch_layout`.  Checked
               (dtype, shape, framework) but not read: the kernels count the rows per rank from
               ``is_token_in_rank``.
            num_tokens_per_rdma_rank: None (what :meth:`get_dispatch_layout` returns: one NVLink
               domain), or int32 [R / ranks_per_node] from :func:`epcomm.get_dispatch_layout`;
               checked like ``num_tokens_per_rank`` and not read (no RDMA ranks here).
            is_token_in_rank, num_tokens_per_expert: bool [N, R] and int32 [E] from
               :meth:`get_dispatch_layout` of the same ``topk_idx``; computed here if omitted
               (then E + R <= 12288, the layout kernel's shared memory).
            topk_idx: int64 (or int32) [N, K] (-1 = none); topk_weights: float32 [N, K].
            expert_alignment: int in [1, 2**20]: each per-expert count is rounded up to a
               multiple of it (the bound keeps the kernel's 32-bit rounding from overflowing).
            num_worst_tokens: if > 0, outputs have exactly this many rows, padding rows have
               top-k index -1; nothing synchronises with the CPU and the call can be captured
               in a CUDA graph; the count list is empty.
            num_experts: needed only when neither ``num_tokens_per_expert`` nor a handle says it.
            config: None (the Buffer's dispatch config) or a :class:`Config` whose ``num_sms``
               does not exceed the GPU's SM count.
            async_finish / previous_event / allocate_on_comm_stream: as in DeepEP
               (``previous_event``: None or an EventOverlap: the kernels wait for it instead of
               the caller's stream; the host index check (EPCOMM_CHECK_INDICES) first waits for
               it on the host, and an int32 top-k's widening copy on the caller's stream waits
               for it too); the last one (torch) allocates the outputs on :attr:`comm_stream`
               and records the caller's stream on them.

        Returns ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list,
        handle, event)`` with ``recv_x`` in the form of ``x``, rows ordered by source rank, then
        source token index; the count list counts top-k slots (a row naming a local expert
        twice counts twice, as in DeepEP), and with ``num_worst_tokens`` the padding rows of
        ``recv_x`` and its scales are unwritten.  In the CPU-synchronised path the outputs are
        usually row views of an allocation made before the counts were known (up to
        EPCOMM_RECV_SPECULATION more rows than the largest of the last four receives of this
        shape; its extra rows are never written).  Raises ValueError/TypeError for bad input
        (before any launch), ValueError if the buffer is too small (with the size needed),
        BufferStateError if the Buffer was destroyed or has no NVLink buffer, EpcommTimeoutError
        if a peer does not arrive within EPCOMM_TIMEOUT_S, RankMismatchError if another rank's
        call has a different hidden size, dtype, top-k width, num_experts or chunk_rows (every
        rank raises it; inside one node nothing is sent, across nodes the rows were already sent
        when the shapes are compared, and nothing is received; the Buffer is unusable afterwards).  With
        ``num_worst_tokens`` these device-side errors are raised by the next call or
        :meth:`synchronize`.
        """
        if self._inter is not None:
            return internode.dispatch(self.ctx, self._inter, self._dispatch_config, x, handle, num_tokens_per_rank,
                                      num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert, topk_idx,
                                      topk_weights, expert_alignment, num_worst_tokens, config, previous_event,
                                      async_finish, allocate_on_comm_stream, num_experts=num_experts)
        return normal.dispatch(self.ctx, self._intra, self._dispatch_config, x, handle, num_tokens_per_rank,
                               num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert, topk_idx,
                               topk_weights, expert_alignment, num_worst_tokens, config, previous_event,
                               async_finish, allocate_on_comm_stream, num_experts=num_experts)

    def combine(self, x, handle: DispatchHandle, topk_weights=None, bias=None, config: Config | None = None,
                previous_event: EventOverlap | None = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False):
        """Reverse a dispatch: every token gets the **unweighted** sum (fp32, in ascending rank
        order, then the biases) of the rows that came from it, written as bf16.  With the
        Buffer's ``numerics="deepep"``: the biases first, and across nodes each node's part
        rounded to bf16, as DeepEP V1 (``epcomm.reference.combine`` gives both orders).

        Args:
            x: bf16 [rows, H], rows in the dispatch's receive order (``rows`` = the dispatch's
               output rows; padding rows are ignored).
            handle: the dispatch's handle (of this Buffer).
            topk_weights: None, or float32 [rows, K] with K the dispatch's top-k width
               (``handle.num_topk``, as in DeepEP: the dispatch's ``recv_topk_weights`` or their
               gradient), reduced the same way.  A dispatch without top-k takes none.
            bias: None, one bf16 [N, H] tensor, or a pair of them (either may be None), added
               after the sum.
            config: None (the Buffer's combine config) or a :class:`Config` whose ``num_sms``
               does not exceed the GPU's SM count.
            previous_event: None or an EventOverlap.  Every array must be of ``x``'s framework.

        Returns ``(combined_x bf16 [N, H], combined_topk_weights float32 [N, K] or None, event)``.
        Graph-capturable.  Raises like :meth:`dispatch`, all before any launch.
        """
        if self._inter is not None:
            return internode.combine(self.ctx, self._inter, self._combine_config, x, handle, topk_weights, bias,
                                     config, previous_event, async_finish, allocate_on_comm_stream)
        return normal.combine(self.ctx, self._intra, self._combine_config, x, handle, topk_weights, bias, config,
                              previous_event, async_finish, allocate_on_comm_stream)

    # ---- low-latency mode (epcomm.low_latency) -------------------------------------------------
    def _ll_state(self) -> LowLatencyState:
        ll, ctx = self._ll, self.ctx
        err = ctx.err
        if ll is not None and not ctx.destroyed and err.poisoned is None and not err.pending():
            return ll  # the common case, checked cheaply (a decode step is tens of microseconds)
        if ctx.destroyed:
            raise BufferStateError("low-latency call: the Buffer was destroyed")
        if ll is None:
            raise BufferStateError("low-latency calls need a Buffer created with low_latency_mode=True")
        ctx.check_usable("low-latency call", collective=True)
        return ll

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             **kw):
        """See :meth:`epcomm.low_latency.LowLatencyState.dispatch`."""
        return self._ll_state().dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, **kw)

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, **kw):
        """See :meth:`epcomm.low_latency.LowLatencyState.combine`."""
        return self._ll_state().combine(x, topk_idx, topk_weights, handle, **kw)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        self._ll_state().clean(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def get_next_low_latency_combine_buffer(self, handle):
        return self._ll_state().next_combine_buffer(handle)
