"""epcomm.deep_ep, the drop-in for DeepEP V1, on the CPU: its public signatures against DeepEP's
(written below as data from DeepEP V1's source), Config's size hints against DeepEP's formulas,
the handle tuples and their way back to epcomm's handles, the layout-range packing, and the
argument checks that must fire before any GPU work.

The calls run on a stand-in for epcomm.Buffer (``FakeNative``) whose results are what
epcomm.Buffer returns (epcomm handles, epcomm EventOverlaps), filled from epcomm.reference; the
GPU path is tests/gpu/test_deep_ep_dropin_gpu.py.
"""
from __future__ import annotations

import inspect
import tomllib
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import epcomm.deep_ep as deep_ep  # noqa: E402
from epcomm import reference  # noqa: E402
from epcomm.config import Config as NativeConfig, default_combine_config, default_dispatch_config  # noqa: E402
from epcomm.deep_ep import buffer as dropin_buffer  # noqa: E402
from epcomm.deep_ep import handles as H  # noqa: E402
from epcomm.errors import BufferStateError  # noqa: E402
from epcomm.internode.handle import InternodeHandle as NativeInternodeHandle  # noqa: E402
from epcomm.low_latency.handle import LowLatencyHandle as NativeLowLatencyHandle  # noqa: E402
from epcomm.normal.handle import DispatchHandle as NativeDispatchHandle  # noqa: E402
from epcomm.runtime import driver  # noqa: E402
from epcomm.runtime.event import EventOverlap as NativeEventOverlap  # noqa: E402
from epcomm.testing import random_bf16, random_topk, random_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
_ = inspect.Parameter.empty

# ---- DeepEP V1's public API, as data ----------------------------------------------------------
# From DeepEP's deep_ep/buffer.py at its last V1 release (the parent of commit b306af0, "Introducing
# EPv2", which moved the file to deep_ep/buffers/legacy.py and dropped use_fabric), deep_ep/utils.py
# there (EventOverlap), and the pybind11 declaration of Config in csrc/deep_ep.cpp.
# name -> (static, [(parameter, default)]), ``_`` for no default; "self" omitted.
DEEPEP_BUFFER = {
    "__init__": (False, [("group", _), ("num_nvl_bytes", 0), ("num_rdma_bytes", 0), ("low_latency_mode", False),
                         ("num_qps_per_rank", 24), ("allow_nvlink_for_low_latency_mode", True),
                         ("allow_mnnvl", False), ("use_fabric", False), ("explicitly_destroy", False),
                         ("enable_shrink", False), ("comm", None)]),
    "destroy": (False, []),
    "is_sm90_compiled": (True, []),
    "set_num_sms": (True, [("new_num_sms", _)]),
    "capture": (True, []),
    "get_low_latency_rdma_size_hint": (True, [("num_max_dispatch_tokens_per_rank", _), ("hidden", _),
                                              ("num_ranks", _), ("num_experts", _)]),
    "get_comm_stream": (False, []),
    "get_local_buffer_tensor": (False, [("dtype", _), ("size", None), ("offset", 0), ("use_rdma_buffer", False)]),
    "get_dispatch_config": (True, [("num_ranks", _)]),
    "get_combine_config": (True, [("num_ranks", _)]),
    "get_dispatch_layout": (False, [("topk_idx", _), ("num_experts", _), ("previous_event", None),
                                    ("async_finish", False), ("allocate_on_comm_stream", False)]),
    "dispatch": (False, [("x", _), ("handle", None), ("num_tokens_per_rank", None), ("num_tokens_per_rdma_rank", None),
                         ("is_token_in_rank", None), ("num_tokens_per_expert", None), ("topk_idx", None),
                         ("topk_weights", None), ("expert_alignment", 1), ("num_worst_tokens", 0), ("config", None),
                         ("previous_event", None), ("async_finish", False), ("allocate_on_comm_stream", False)]),
    "combine": (False, [("x", _), ("handle", _), ("topk_weights", None), ("bias", None), ("config", None),
                        ("previous_event", None), ("async_finish", False), ("allocate_on_comm_stream", False)]),
    "internode_dispatch": (False, [("x", _), ("handle", None), ("num_tokens_per_rank", None),
                                   ("num_tokens_per_rdma_rank", None), ("is_token_in_rank", None),
                                   ("num_tokens_per_expert", None), ("topk_idx", None), ("topk_weights", None),
                                   ("expert_alignment", 1), ("num_worst_tokens", 0), ("config", None),
                                   ("previous_event", None), ("async_finish", False),
                                   ("allocate_on_comm_stream", False)]),
    "internode_combine": (False, [("x", _), ("handle", _), ("topk_weights", None), ("bias", None), ("config", None),
                                  ("previous_event", None), ("async_finish", False),
                                  ("allocate_on_comm_stream", False)]),
    "clean_low_latency_buffer": (False, [("num_max_dispatch_tokens_per_rank", _), ("hidden", _), ("num_experts", _)]),
    "low_latency_dispatch": (False, [("x", _), ("topk_idx", _), ("num_max_dispatch_tokens_per_rank", _),
                                     ("num_experts", _), ("cumulative_local_expert_recv_stats", None),
                                     ("dispatch_wait_recv_cost_stats", None), ("use_fp8", True),
                                     ("round_scale", False), ("use_ue8m0", False), ("async_finish", False),
                                     ("return_recv_hook", False)]),
    "low_latency_combine": (False, [("x", _), ("topk_idx", _), ("topk_weights", _), ("handle", _),
                                    ("use_logfmt", False), ("zero_copy", False), ("async_finish", False),
                                    ("return_recv_hook", False), ("out", None), ("combine_wait_recv_cost_stats", None)]),
    "low_latency_update_mask_buffer": (False, [("rank_to_mask", _), ("mask", False)]),
    "low_latency_query_mask_buffer": (False, [("mask_status", _)]),
    "low_latency_clean_mask_buffer": (False, []),
    "get_next_low_latency_combine_buffer": (False, [("handle", _)]),
}
DEEPEP_EVENT_OVERLAP = [("event", None), ("extra_tensors", None)]
DEEPEP_CONFIG = [("num_sms", 20), ("num_max_nvl_chunked_send_tokens", 6), ("num_max_nvl_chunked_recv_tokens", 256),
                 ("num_max_rdma_chunked_send_tokens", 6), ("num_max_rdma_chunked_recv_tokens", 256)]
# What each call returns (DeepEP's tuples), and the arity of its handles.
DEEPEP_ARITY = {"get_dispatch_layout": 5, "dispatch": 6, "combine": 3, "internode_dispatch": 6,
                "internode_combine": 3, "low_latency_dispatch": 5, "low_latency_combine": 3}
DEEPEP_HANDLE_ARITY = {"intranode": 6, "internode": 10, "low_latency": 5}


def _params(fn, drop_self: bool):
    ps = list(inspect.signature(fn).parameters.values())
    if drop_self:
        assert ps and ps[0].name == "self"
        ps = ps[1:]
    return ps


@pytest.mark.parametrize("name", sorted(DEEPEP_BUFFER))
def test_buffer_signatures_match_deepep_v1(name):
    static, want = DEEPEP_BUFFER[name]
    raw = inspect.getattr_static(deep_ep.Buffer, name)
    assert isinstance(raw, staticmethod) == static, f"{name}: static in DeepEP: {static}"
    got = _params(getattr(deep_ep.Buffer, name), drop_self=not static)
    assert [(p.name, p.default) for p in got] == want
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in got), name


def test_every_public_buffer_method_is_deepeps():
    ours = {n for n, v in vars(deep_ep.Buffer).items() if not n.startswith("_") and callable(v)
            and not isinstance(v, type)}
    ours |= {n for c in deep_ep.Buffer.__mro__[1:-1] for n, v in vars(c).items()
             if not n.startswith("_") and callable(v)}
    assert ours == set(DEEPEP_BUFFER) - {"__init__"}
    assert deep_ep.Buffer.num_sms == 20


def test_config_and_event_signatures_and_exports():
    assert [(p.name, p.default) for p in _params(deep_ep.Config, drop_self=False)] == DEEPEP_CONFIG
    assert [(p.name, p.default) for p in _params(deep_ep.EventOverlap.__init__, drop_self=True)] == DEEPEP_EVENT_OVERLAP
    assert deep_ep.topk_idx_t is torch.int64
    for name in ("Buffer", "Config", "EventOverlap", "EventHandle", "topk_idx_t"):
        assert name in deep_ep.__all__ and hasattr(deep_ep, name)
    from epcomm.deep_ep import utils
    assert utils.EventOverlap is deep_ep.EventOverlap and utils.EventHandle is deep_ep.EventHandle


# ---- Config: DeepEP's checks and size hints -----------------------------------------------------
# DeepEP V1's csrc/config.hpp, transcribed line by line (NUM_MAX_NVL_PEERS 8, kNumMaxTopK 128,
# kNumMaxScales 128, sizeof(topk_idx_t) 8, get_source_meta_bytes() 8, sizeof(int4) 16).
def _deepep_nvl_hint(num_sms, nvl_recv, hidden_bytes, num_ranks):
    num_rdma_ranks = max(num_ranks // 8, 1)
    num_nvl_ranks = min(num_ranks, 8)
    num_channels = num_sms // 2
    b = 0
    b += num_channels * num_nvl_ranks * (2 * num_rdma_ranks + 3) * 4
    b += num_channels * num_nvl_ranks * nvl_recv * hidden_bytes
    b += num_channels * num_nvl_ranks * nvl_recv * 8
    b += num_channels * num_nvl_ranks * nvl_recv * 128 * 8
    b += num_channels * num_nvl_ranks * nvl_recv * 128 * 4
    b += num_channels * num_nvl_ranks * nvl_recv * 128 * 4
    return ((b + 127) // 128) * 128


def _deepep_rdma_hint(num_sms, rdma_send, rdma_recv, hidden_bytes, num_ranks):
    if num_ranks <= 8:
        return 0
    rdma_recv = (rdma_recv + rdma_send - 1) // rdma_send * rdma_send  # the constructor's align_up
    num_rdma_ranks = num_ranks // 8
    num_channels = num_sms // 2
    b = 0
    b += num_channels * num_rdma_ranks * (8 * 2 + 2) * 2 * 4
    b += num_channels * num_rdma_ranks * rdma_recv * hidden_bytes * 2
    b += num_channels * num_rdma_ranks * rdma_recv * 8 * 2
    b += num_channels * num_rdma_ranks * rdma_recv * 128 * 8 * 2
    b += num_channels * num_rdma_ranks * rdma_recv * 128 * 4 * 2
    b += num_channels * num_rdma_ranks * rdma_recv * 128 * 4 * 2
    b += num_channels * num_rdma_ranks * rdma_recv * 16 * 2
    return ((b + 127) // 128) * 128


_CHUNKS = sorted(set(dropin_buffer.cfg.DISPATCH_TABLE.values()) | set(dropin_buffer.cfg.COMBINE_TABLE.values())
                 | {(6, 256, 6, 256), (3, 7, 5, 11)})


@pytest.mark.parametrize("chunks", _CHUNKS)
def test_size_hints_equal_deepeps_formulas(chunks):
    nvl_send, nvl_recv, rdma_send, rdma_recv = chunks
    for num_sms in (2, 20, 24, 32, 132):
        c = deep_ep.Config(num_sms, nvl_send, nvl_recv, rdma_send, rdma_recv)
        for hidden_bytes in (1, 2048 * 2, 2880 * 2, 7168, 7168 * 2, 16384 * 2):
            for R in (1, 2, 3, 4, 7, 8, 16, 24, 32, 64, 160):
                assert c.get_nvl_buffer_size_hint(hidden_bytes, R) == _deepep_nvl_hint(num_sms, nvl_recv,
                                                                                         hidden_bytes, R)
                assert c.get_rdma_buffer_size_hint(hidden_bytes, R) == _deepep_rdma_hint(
                    num_sms, rdma_send, rdma_recv, hidden_bytes, R)
    # One value worked by hand: 12 channels x 8 peers x 256 slots of (14336 + 8 + 1024 + 512 + 512)
    # bytes, plus 12 x 8 x 5 ints.
    assert deep_ep.Config(24, 6, 256, 6, 128).get_nvl_buffer_size_hint(14336, 8) == 402851712


def test_size_hints_refuse_what_deepep_asserts():
    c = deep_ep.Config(24, 6, 256, 6, 128)
    with pytest.raises(ValueError, match="multiple of 8"):
        c.get_nvl_buffer_size_hint(14336, 12)
    with pytest.raises(ValueError, match="multiple of 8"):
        c.get_rdma_buffer_size_hint(14336, 12)
    odd = deep_ep.Config(23, 6, 256, 6, 128)
    assert odd.get_nvl_buffer_size_hint(14336, 8) == _deepep_nvl_hint(23, 256, 14336, 8)  # fine up to 8 ranks
    with pytest.raises(ValueError, match="even"):
        odd.get_nvl_buffer_size_hint(14336, 16)
    with pytest.raises(ValueError, match="even"):
        odd.get_rdma_buffer_size_hint(14336, 16)
    with pytest.raises(TypeError):
        c.get_nvl_buffer_size_hint(14336.0, 8)
    with pytest.raises(ValueError):
        c.get_nvl_buffer_size_hint(0, 8)


def test_config_constructor_checks_as_deepep():
    assert deep_ep.Config(20, 6, 256, 6, 128).num_max_rdma_chunked_recv_tokens == 132  # align_up(128, 6)
    assert deep_ep.Config(20, 6, 256, 200, 256).num_max_rdma_chunked_recv_tokens == 400  # 200 <= 400 / 2: accepted
    assert deep_ep.Config(np.int64(24)).num_sms == 24 and type(deep_ep.Config(np.int64(24)).num_sms) is int
    for bad in [dict(num_sms=-1), dict(num_max_nvl_chunked_send_tokens=0),
                dict(num_max_nvl_chunked_send_tokens=256, num_max_nvl_chunked_recv_tokens=256),
                dict(num_max_rdma_chunked_send_tokens=0),
                dict(num_max_rdma_chunked_send_tokens=200, num_max_rdma_chunked_recv_tokens=150)]:
        with pytest.raises(ValueError):
            deep_ep.Config(**bad)
    for bad in [dict(num_sms=20.0), dict(num_sms=True), dict(num_max_nvl_chunked_recv_tokens="256")]:
        with pytest.raises(TypeError):
            deep_ep.Config(**bad)
    with pytest.raises(Exception):
        deep_ep.Config().num_sms = 3  # immutable, as the hints assume


def test_recommended_configs_and_set_num_sms(monkeypatch):
    monkeypatch.setattr(deep_ep.Buffer, "num_sms", 20)
    assert deep_ep.Buffer.get_dispatch_config(8) == deep_ep.Config(20, 6, 256, 6, 128)
    assert deep_ep.Buffer.get_combine_config(2) == deep_ep.Config(20, 10, 256, 6, 128)
    assert deep_ep.Buffer.get_dispatch_config(160) == deep_ep.Config(20, 28, 720, 12, 128)
    deep_ep.Buffer.set_num_sms(24)
    assert deep_ep.Buffer.num_sms == 24 and deep_ep.Buffer.get_combine_config(4).num_sms == 24
    with pytest.raises(ValueError, match="even"):
        deep_ep.Buffer.set_num_sms(23)
    with pytest.raises(TypeError):
        deep_ep.Buffer.set_num_sms(24.0)
    assert deep_ep.Buffer.num_sms == 24
    with pytest.raises(ValueError, match="no recommended config for 3 ranks"):
        deep_ep.Buffer.get_dispatch_config(3)


# ---- a stand-in for epcomm.Buffer ---------------------------------------------------------------
def _bf16(a):
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)


class Job:
    """Every rank's tokens and routing, and epcomm.reference's dispatch of them."""

    def __init__(self, R=4, N=12, Hd=128, E=8, K=3, seed=0, worst=0):
        rng = np.random.default_rng(seed)
        self.R, self.N, self.H, self.E, self.K = R, N, Hd, E, K
        self.topk = [random_topk(rng, N, E, K, drop_prob=0.2) for _ in range(R)]
        self.w = [random_weights(rng, t) for t in self.topk]
        self.x = [random_bf16(rng, (N, Hd)) for _ in range(R)]
        self.res = reference.dispatch(self.x, E, topk_idx=self.topk, topk_weights=self.w, num_worst_tokens=worst)
        L = E // R
        # DeepEP's meaning of the rank prefix matrix's column d: rows from ranks 0..i, inclusive.
        self.sent = np.array([[int(((t // L) == d).any(axis=1).sum()) for d in range(R)] for t in self.topk])

    def native_handle(self, rank, cls=NativeDispatchHandle, **extra):
        r = self.res[rank]
        h = r.handle
        return cls(buffer_id=1, framework="torch", device_id=0, num_ranks=self.R, rank=rank, num_tokens=self.N,
                   hidden=self.H, num_experts=self.E, num_topk=self.K, num_worst_tokens=0,
                   out_rows=r.recv_x.shape[0], num_recv_tokens=h.num_recv_tokens, recv_counts=None,
                   rank_prefix=torch.from_numpy(h.rank_prefix.astype(np.int32)), send_list=None,
                   send_pos=torch.from_numpy(h.send_pos), send_count=None,
                   is_token_in_rank=torch.from_numpy(h.is_token_in_rank),
                   recv_src_idx=torch.from_numpy(h.recv_src_idx), **extra)


class FakeNative:
    """What the drop-in reads of an epcomm.Buffer, for rank ``rank`` of ``job``: its calls return
    epcomm's result tuples (epcomm handles and EventOverlaps) and are recorded in ``calls``."""

    def __init__(self, job: Job, rank: int = 1, internode: bool = False):
        self.job, self.rank, self.num_ranks, self.internode = job, rank, job.R, internode
        self.device_id, self.comm_stream = 0, 0
        self.calls = []
        self.ll = None

    def get_dispatch_config(self):
        return default_dispatch_config(self.num_ranks)

    def get_combine_config(self):
        return default_combine_config(self.num_ranks)

    def get_dispatch_layout(self, topk_idx, num_experts, previous_event, async_finish, allocate_on_comm_stream):
        self.calls.append(("get_dispatch_layout", num_experts, previous_event, async_finish, allocate_on_comm_stream))
        R = self.num_ranks
        return (torch.zeros(R, dtype=torch.int32), None, torch.zeros(num_experts, dtype=torch.int32),
                torch.zeros(topk_idx.shape[0], R, dtype=torch.bool), NativeEventOverlap(None))

    def dispatch(self, x, handle=None, *args, **kw):
        self.calls.append(("dispatch", handle, args, kw))
        if handle is not None:
            return x, None, None, [], handle, NativeEventOverlap(None)
        r = self.job.res[self.rank]
        extra = dict(ranks_per_node=2, chunk_rows=32) if self.internode else {}
        native = self.job.native_handle(self.rank, NativeInternodeHandle if self.internode else NativeDispatchHandle,
                                        **extra)
        return (_bf16(r.recv_x), torch.from_numpy(r.recv_topk_idx), torch.from_numpy(r.recv_topk_weights),
                list(r.num_recv_tokens_per_expert_list), native, NativeEventOverlap(None))

    def combine(self, x, handle, *args):
        self.calls.append(("combine", handle, args))
        return torch.zeros(self.job.N, x.shape[1], dtype=x.dtype), None, NativeEventOverlap(None)

    def low_latency_dispatch(self, x, topk_idx, T, E, **kw):
        self.calls.append(("low_latency_dispatch", T, E, kw))
        return None, None, self.ll, NativeEventOverlap(None), None

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, **kw):
        self.calls.append(("low_latency_combine", handle, kw))
        return None, NativeEventOverlap(None), None

    def get_next_low_latency_combine_buffer(self, handle):
        self.calls.append(("next_buffer", handle))
        return "buffer"


def _dropin(job, rank=1, internode=False):
    return deep_ep.Buffer._around(FakeNative(job, rank, internode), group="g", num_nvl_bytes=1 << 20)


def _ll_job(R=4, T=8, Hd=128, E=8, K=3, seed=1):
    rng = np.random.default_rng(seed)
    topk = [random_topk(rng, rng.integers(0, T + 1), E, K, drop_prob=0.1) for _ in range(R)]
    xs = [random_bf16(rng, (t.shape[0], Hd)) for t in topk]
    return topk, reference.low_latency_dispatch(xs, topk, T, E, use_fp8=False)


def _native_ll(res, T, Hd, E, K):
    h = res.handle
    return NativeLowLatencyHandle(slot=0, generation=1, framework="torch", num_max_tokens=T, hidden=Hd,
                                  num_experts=E, num_topk=K, num_tokens=0,
                                  src_info=torch.from_numpy(h.src_info), layout_range=torch.from_numpy(h.layout_range))


# ---- calls: arities, element meanings, the way back -------------------------------------------
def test_return_arities_are_deepeps():
    job = Job()
    for internode in (False, True):
        buf = _dropin(job, internode=internode)
        topk = torch.from_numpy(job.topk[1])
        x = _bf16(job.x[1])
        out = {"get_dispatch_layout": buf.get_dispatch_layout(topk, job.E),
               "dispatch": buf.dispatch(x, topk_idx=topk, num_tokens_per_expert=torch.zeros(job.E, dtype=torch.int32))}
        handle = out["dispatch"][4]
        out["combine"] = buf.combine(out["dispatch"][0], handle)
        if internode:
            out["internode_dispatch"] = buf.internode_dispatch(x, topk_idx=topk)
            out["internode_combine"] = buf.internode_combine(out["dispatch"][0], handle)
        for name, got in out.items():
            assert type(got) is tuple and len(got) == DEEPEP_ARITY[name], name
            assert type(got[-1]) is deep_ep.EventOverlap, name
        assert len(handle) == DEEPEP_HANDLE_ARITY["internode" if internode else "intranode"]
    topk, res = _ll_job()
    buf = _dropin(job)
    buf.native.ll = _native_ll(res[1], 8, 128, 8, 3)
    d = buf.low_latency_dispatch(None, None, 8, 8)
    c = buf.low_latency_combine(None, None, None, d[2])
    assert len(d) == DEEPEP_ARITY["low_latency_dispatch"] and len(c) == DEEPEP_ARITY["low_latency_combine"]
    assert len(d[2]) == DEEPEP_HANDLE_ARITY["low_latency"] and type(d[3]) is deep_ep.EventOverlap


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_intranode_handle_element_meanings(rank):
    job = Job(R=4, N=12)
    buf = _dropin(job, rank)
    *_, handle, _ = buf.dispatch(_bf16(job.x[rank]), topk_idx=torch.from_numpy(job.topk[rank]))
    m, chan, recv_chan, src_idx, itr, send_head = handle
    native = handle.native
    # Column ``rank``: rows received from ranks 0..i (DeepEP's definition), no all-gather needed.
    want = np.cumsum(job.sent[:, rank])
    assert m.dtype == torch.int32 and tuple(m.shape) == (job.R, job.R)
    assert m[:, rank].tolist() == want.tolist()
    assert m[-1][rank].item() == native.num_recv_tokens == job.res[rank].recv_x.shape[0]
    assert m.stride() == (1, 0) and m.data_ptr() == native.rank_prefix[1:].data_ptr()  # a view, no kernel
    assert src_idx is native.recv_src_idx and itr is native.is_token_in_rank
    assert chan is None and recv_chan is None and send_head is None


def test_internode_handle_element_meanings():
    job = Job(R=4, N=10)
    buf = _dropin(job, 2, internode=True)
    handle = buf.dispatch(_bf16(job.x[2]), topk_idx=torch.from_numpy(job.topk[2]))[4]
    assert isinstance(handle, H.InternodeHandle) and len(handle) == 10
    assert handle[0] is handle.native.is_token_in_rank
    assert handle[6].tolist() == np.cumsum(job.sent[:, 2]).tolist()  # recv_gbl_rank_prefix_sum
    assert [i for i, e in enumerate(handle) if e is None] == [1, 2, 3, 4, 5, 7, 8, 9]


def test_combine_and_cached_dispatch_find_the_native_handle_again():
    job = Job()
    buf = _dropin(job)
    native = buf.native
    x = _bf16(job.x[1])
    recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=torch.from_numpy(job.topk[1]))
    # As the tuple, as a plain tuple of its elements, and through autograd's saved tensors
    # (ctx.save_for_backward(*handle), as xtuner does).
    saved = []

    class Keep(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t, *h):
            ctx.save_for_backward(*h)
            return t * 2

        @staticmethod
        def backward(ctx, g):
            saved.append(ctx.saved_tensors)
            return (g,) + (None,) * 6

    t = torch.ones(2, requires_grad=True)
    Keep.apply(t, *handle).sum().backward()
    for h in (handle, tuple(handle), list(handle), saved[0]):
        buf.combine(recv_x, h)
        assert native.calls[-1][0] == "combine" and native.calls[-1][1] is handle.native
    # cached dispatch: DeepEP's (recv_x, None, None, None, None, event); routing counts ignored
    out = buf.dispatch(x, handle=tuple(handle), num_tokens_per_rank=torch.zeros(4, dtype=torch.int32),
                       expert_alignment=128)
    assert out[1:5] == (None, None, None, None) and type(out[5]) is deep_ep.EventOverlap
    assert native.calls[-1][1] is handle.native and native.calls[-1][3]["num_worst_tokens"] == 0
    with pytest.raises(ValueError, match="topk_idx and topk_weights must be None"):
        buf.dispatch(x, handle=handle, topk_idx=torch.from_numpy(job.topk[1]))


def test_wrong_handles_raise_type_error():
    job = Job()
    intra, inter = _dropin(job), _dropin(job, internode=True)
    x = _bf16(job.x[1])
    h_intra = intra.dispatch(x, topk_idx=torch.from_numpy(job.topk[1]))[4]
    h_inter = inter.dispatch(x, topk_idx=torch.from_numpy(job.topk[1]))[4]
    n = len(intra.native.calls)
    for buf, h in ((inter, h_intra), (intra, h_inter), (intra, tuple(h_intra)[1:]), (intra, (None,) * 6),
                   (intra, h_intra.native), (intra, "handle")):
        with pytest.raises(TypeError, match="handle"):
            buf.combine(x, h)
    # a tuple of an internode handle's elements is not an intranode one, even at the right length
    with pytest.raises(TypeError):
        intra.combine(x, (None, None, None, None, None, h_inter[6]))
    assert len(intra.native.calls) == n  # nothing reached epcomm


def test_internode_calls_on_a_one_node_buffer_raise_before_any_work():
    job = Job()
    buf = _dropin(job)
    with pytest.raises(ValueError, match="inside one node"):
        buf.internode_dispatch(_bf16(job.x[1]), topk_idx=torch.from_numpy(job.topk[1]))
    with pytest.raises(ValueError, match="inside one node"):
        buf.internode_combine(_bf16(job.x[1]), None)
    assert buf.native.calls == []


def test_torch_only():
    job = Job()
    buf = _dropin(job)
    with pytest.raises(TypeError, match="torch tensors"):
        buf.dispatch(np.zeros((2, 128)), topk_idx=torch.from_numpy(job.topk[1]))
    with pytest.raises(TypeError, match="torch tensors"):
        buf.get_dispatch_layout(job.topk[1], job.E)


def test_configs_reach_epcomm_as_documented(monkeypatch):
    monkeypatch.setattr(deep_ep.Buffer, "num_sms", 20)
    job = Job()
    buf = _dropin(job)
    x, topk = _bf16(job.x[1]), torch.from_numpy(job.topk[1])

    def sent_config():
        call = buf.native.calls[-1]
        return call[2][8] if call[0] == "dispatch" else call[2][2]

    buf.dispatch(x, topk_idx=topk)
    c = sent_config()
    assert isinstance(c, NativeConfig) and c == default_dispatch_config(job.R).with_sms(20)
    buf.dispatch(x, topk_idx=topk, config=deep_ep.Config(32, 6, 256, 6, 128))
    assert sent_config() == default_dispatch_config(job.R).with_sms(32)  # only num_sms carries over
    mine = NativeConfig(num_sms=16, chunk_rows=7, send_fraction=0.25)
    buf.dispatch(x, topk_idx=topk, config=mine)
    assert sent_config() is mine
    deep_ep.Buffer.set_num_sms(26)
    buf.combine(x, buf.dispatch(x, topk_idx=topk)[4])
    assert sent_config() == default_combine_config(job.R).with_sms(26)
    for bad, err in (({"num_sms": 24}, TypeError), (deep_ep.Config(0), ValueError), ([24], TypeError)):
        with pytest.raises(err):
            buf.dispatch(x, topk_idx=topk, config=bad)


# ---- low-latency handle: DeepEP's packed layout_range --------------------------------------------
def _deepep_pack2(begin, count):
    """DeepEP's pack2<int, int64_t>(count, begin): the two ints side by side in memory, count
    first, read as one little-endian int64."""
    return np.stack([count, begin], axis=-1).astype(np.int32).view(np.int64)[..., 0]


def test_layout_range_packing_round_trips():
    rng = np.random.default_rng(3)
    begin = rng.integers(0, 2**31 - 1, size=(5, 7))
    count = rng.integers(0, 2**31 - 1, size=(5, 7))
    ranges = torch.from_numpy(np.stack([begin, count], -1).astype(np.int32))
    packed = H.pack_layout_range(ranges)
    assert packed.dtype == torch.int64 and tuple(packed.shape) == (5, 7)
    assert packed.numpy().tolist() == _deepep_pack2(begin, count).tolist()
    assert torch.equal(H.unpack_layout_range(packed), ranges)
    assert torch.equal(H.unpack_layout_range(torch.from_numpy(_deepep_pack2(begin, count))), ranges)
    with pytest.raises(ValueError):
        H.pack_layout_range(ranges.to(torch.int64))
    with pytest.raises(ValueError):
        H.unpack_layout_range(packed.to(torch.int32))


@pytest.mark.parametrize("rank", [0, 2])
def test_low_latency_handle_is_deepeps(rank):
    R, T, Hd, E, K = 4, 8, 128, 8, 3
    topk, res = _ll_job(R, T, Hd, E, K)
    native = _native_ll(res[rank], T, Hd, E, K)
    h = H.LowLatencyHandle(native)
    # DeepEP's meaning, from the routing itself: rows of local expert j from source s start after
    # the rows from sources before s.
    L = E // R
    count = np.array([[int((topk[s] == rank * L + j).sum()) for s in range(R)] for j in range(L)])
    begin = np.cumsum(count, axis=1) - count
    src_info, layout_range, t, hidden, e = h  # unpacking
    assert (t, hidden, e) == (T, Hd, E) and src_info is native.src_info
    assert layout_range.dtype == torch.int64 and tuple(layout_range.shape) == (L, R)
    assert layout_range.tolist() == _deepep_pack2(begin, count).tolist()
    for got in (h[1], h[-4], h[0:2][1], list(h)[1]):
        assert torch.equal(got, layout_range)
    assert h[1] is not h[1]  # made on each access, never cached stale
    assert "packed on access" in repr(h)
    # the way back: the tuple, or its elements (the packed element carries epcomm's handle)
    assert H.native_of(h, H.LowLatencyHandle) is native
    assert H.native_of(tuple(h), H.LowLatencyHandle) is native
    with pytest.raises(TypeError):
        H.native_of((native.src_info, native.layout_range, T, Hd, E), H.LowLatencyHandle)


def test_low_latency_calls_forward_every_argument():
    job = Job()
    buf = _dropin(job)
    topk, res = _ll_job()
    buf.native.ll = _native_ll(res[1], 8, 128, 8, 3)
    stats = torch.zeros(2, dtype=torch.int32)
    wait = torch.zeros(4, dtype=torch.int64)
    _, _, h, _, _ = buf.low_latency_dispatch("x", "idx", 8, 8, cumulative_local_expert_recv_stats=stats,
                                             dispatch_wait_recv_cost_stats=wait, use_fp8=False, round_scale=True,
                                             use_ue8m0=True, async_finish=True, return_recv_hook=True)
    assert buf.native.calls[-1] == ("low_latency_dispatch", 8, 8, dict(
        use_fp8=False, round_scale=True, use_ue8m0=True, async_finish=True, return_recv_hook=True,
        cumulative_local_expert_recv_stats=stats, dispatch_wait_recv_cost_stats=wait))
    buf.low_latency_combine("x", "idx", "w", h, use_logfmt=True, out="out", combine_wait_recv_cost_stats=wait)
    assert buf.native.calls[-1] == ("low_latency_combine", h.native, dict(
        use_logfmt=True, zero_copy=False, async_finish=False, return_recv_hook=False, out="out",
        combine_wait_recv_cost_stats=wait))
    assert buf.get_next_low_latency_combine_buffer(h) == "buffer" and buf.native.calls[-1][1] is h.native
    n = len(buf.native.calls)
    with pytest.raises(TypeError, match="handle"):
        buf.low_latency_combine("x", "idx", "w", buf.dispatch(_bf16(job.x[1]), topk_idx=torch.from_numpy(job.topk[1]))[4])
    assert [c for c in buf.native.calls[n:] if c[0].startswith("low_latency")] == []


def test_raw_buffers_raise_not_implemented():
    buf = _dropin(Job())
    with pytest.raises(NotImplementedError, match="get_next_low_latency_combine_buffer"):
        buf.get_local_buffer_tensor(torch.bfloat16)
    assert deep_ep.Buffer.is_sm90_compiled() is True


# ---- the constructor: every argument checked before a GPU is touched ---------------------------
class _NoGPU:
    """Stands in for epcomm.Buffer: records the arguments, or fails the test when ``refuse``."""
    made: list = []
    refuse = False

    def __init__(self, group, num_nvl_bytes, num_rdma_bytes, *, low_latency_mode, numerics, enable_shrink):
        assert not _NoGPU.refuse, "the epcomm Buffer (GPU work) was reached before the arguments were checked"
        assert numerics == "deepep", "the drop-in must ask for DeepEP's arithmetic"
        _NoGPU.made.append((group, num_nvl_bytes, num_rdma_bytes, low_latency_mode))
        self.rank, self.num_ranks, self.internode = 0, 2, False
        self.destroyed = False

    def destroy(self):
        self.destroyed = True


@pytest.fixture()
def no_gpu(monkeypatch):
    monkeypatch.setattr(dropin_buffer, "NativeBuffer", _NoGPU)
    _NoGPU.made, _NoGPU.refuse = [], True
    return _NoGPU


@pytest.mark.parametrize("kw, err, match", [
    (dict(group=None), ValueError, "Either 'group' or 'comm'"),
    (dict(num_nvl_bytes=-1), ValueError, "num_nvl_bytes"),
    (dict(num_nvl_bytes=1.5), TypeError, "num_nvl_bytes"),
    (dict(num_rdma_bytes=-4), ValueError, "num_rdma_bytes"),
    (dict(low_latency_mode="yes"), TypeError, "low_latency_mode"),
    (dict(num_qps_per_rank=0), ValueError, "num_qps_per_rank"),
    (dict(num_qps_per_rank="24"), TypeError, "num_qps_per_rank"),
    (dict(num_qps_per_rank=True), TypeError, "num_qps_per_rank"),
    (dict(allow_nvlink_for_low_latency_mode=None), TypeError, "allow_nvlink_for_low_latency_mode"),
    (dict(allow_mnnvl=2), TypeError, "allow_mnnvl"),
    (dict(use_fabric="no"), TypeError, "use_fabric"),
    (dict(explicitly_destroy=None), TypeError, "explicitly_destroy"),
    (dict(enable_shrink=[]), TypeError, "enable_shrink"),
    (dict(low_latency_mode=True, num_rdma_bytes=1 << 20, allow_nvlink_for_low_latency_mode=False),
     NotImplementedError, "EPCOMM_LL_FORCE_NVSHMEM_PUT"),
    (dict(num_rdma_bytes=1 << 20, allow_nvlink_for_low_latency_mode=False), NotImplementedError, "per-Buffer"),
])
def test_constructor_checks_every_argument_first(no_gpu, kw, err, match):
    args = dict(group="g")
    args.update(kw)
    with pytest.raises(err, match=match):
        deep_ep.Buffer(**args)


def test_constructor_passes_what_epcomm_needs(no_gpu):
    no_gpu.refuse = False
    b = deep_ep.Buffer("g", 1 << 20, 0, False, 8, False, True, True, False, True, None)  # DeepEP's order
    assert no_gpu.made[-1] == ("g", 1 << 20, 0, False)
    assert (b.group, b.rank, b.group_size, b.num_nvl_bytes, b.num_rdma_bytes) == ("g", 0, 2, 1 << 20, 0)
    assert (b.low_latency_mode, b.explicitly_destroy, b.enable_shrink) == (False, False, True)
    with pytest.raises(BufferStateError, match="explicitly_destroy"):
        b.destroy()
    assert not b.native.destroyed
    c = deep_ep.Buffer(None, 0, 1 << 20, low_latency_mode=True, explicitly_destroy=True, comm="mpi")
    assert no_gpu.made[-1] == ("mpi", 0, 1 << 20, True) and c.group == "mpi"
    c.destroy()
    assert c.native.destroyed


# ---- events --------------------------------------------------------------------------------------
def test_event_overlap_is_deepeps_on_epcomms(monkeypatch):
    ev = deep_ep.EventOverlap()
    assert ev.event is None and ev.extra_tensors is None
    ev.current_stream_wait()  # nothing to wait for
    with ev:
        pass
    keep = (torch.zeros(1),)
    assert deep_ep.EventOverlap(None, keep).extra_tensors is keep
    with pytest.raises(TypeError, match="EventHandle"):
        deep_ep.EventOverlap("event")
    # an EventHandle records on torch's current stream; here a recorder stands in for the driver
    destroyed = []
    monkeypatch.setattr(NativeEventOverlap, "record",
                        classmethod(lambda cls, fw="torch", device_id=None: NativeEventOverlap(1234, fw, 0, capture=0)))
    monkeypatch.setattr(driver, "event_destroy", destroyed.append)
    handle = deep_ep.EventHandle()
    assert handle.event == 1234 and destroyed == []  # the recorder's object gave its event up
    ov = deep_ep.EventOverlap(handle, keep)
    assert ov.event == 1234 and ov.extra_tensors is keep and ov.capture == 0
    assert isinstance(ov, NativeEventOverlap)  # every epcomm call takes it as previous_event
    del handle, ov
    assert destroyed == [1234]  # freed once, by the handle, after the overlap let it go
    cap = deep_ep.Buffer.capture()
    assert type(cap) is deep_ep.EventOverlap and cap.event == 1234


def test_adopt_reclasses_without_copying():
    from epcomm.deep_ep.event import adopt
    native = NativeEventOverlap(None, "torch", 0, extra=["kept"])
    assert adopt(native) is native and type(native) is deep_ep.EventOverlap
    assert native.extra_tensors == ["kept"]
    assert adopt(None) is None


# ---- layering --------------------------------------------------------------------------------------
def test_deep_ep_sits_at_the_api_layer_and_may_import_torch():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    api = next(layer for layer in layers if "epcomm.api" in layer)
    assert "epcomm.deep_ep" in [s.strip() for s in api.split("|")]
    forbidden = next(c for c in contracts if c["type"] == "forbidden")
    assert not any(m == "epcomm.deep_ep" or m.startswith("epcomm.deep_ep.") for m in forbidden["source_modules"])
