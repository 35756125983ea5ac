"""The group's nodes (epcomm.runtime.topology): declared nodes, discovery from host names and
peer access (the pure rule, and the collective run by threads standing in for ranks over a fake
driver), and the low-latency rule that peers on other nodes are reached by puts.  No GPU."""
from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from epcomm import envs
from epcomm.errors import EpcommError
from epcomm.low_latency import state as ll_state
from epcomm.low_latency.state import LowLatencyState, nvlink_links
from epcomm.runtime import driver
from epcomm.runtime import nvshmem as nvr
from epcomm.runtime import topology
from epcomm.runtime.topology import Topology, declare, discover, from_hosts

from fake_runtime import FakeGroup, fake_context

KNOB = "EPCOMM_RANKS_PER_NODE"


@pytest.fixture(autouse=True)
def _no_declared_nodes(monkeypatch):
    monkeypatch.delenv(KNOB, raising=False)


# ---- Topology ---------------------------------------------------------------------------------

def test_ranks_are_numbered_node_by_node():
    t = Topology(8, 4)
    assert (t.num_nodes, t.spans_nodes, t.declared) == (2, True, False)
    assert [t.node_of(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [t.local_of(r) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert all(t.rank_of(t.node_of(r), t.local_of(r)) == r for r in range(8))
    assert t.rank_of(1, 2) == 6 and list(t.node_ranks(1)) == [4, 5, 6, 7]
    assert t.same_node(1, 3) and t.same_node(4, 7) and not t.same_node(3, 4)
    one = Topology(4, 4)
    assert one.num_nodes == 1 and not one.spans_nodes and one.same_node(0, 3)
    singles = Topology(3, 1)
    assert singles.num_nodes == 3 and [singles.local_of(r) for r in range(3)] == [0, 0, 0]


@pytest.mark.parametrize("rank", [-1, 8])
def test_a_rank_outside_the_group_is_refused(rank):
    t = Topology(8, 4)
    with pytest.raises(ValueError, match="rank"):
        t.node_of(rank)
    with pytest.raises(ValueError, match="rank"):
        t.local_of(rank)
    with pytest.raises(ValueError, match="local"):
        t.rank_of(0, 4)


@pytest.mark.parametrize("n, p", [(8, 3), (8, 0), (8, 16), (0, 1)])
def test_a_topology_needs_equal_nodes(n, p):
    with pytest.raises(ValueError):
        Topology(n, p)


# ---- declared nodes ---------------------------------------------------------------------------

def test_declared_nodes():
    t = declare(8, 2)
    assert t == Topology(8, 2, declared=True) and t.num_nodes == 4
    assert declare(4, 4).spans_nodes is False


def test_declared_nodes_must_divide_the_group():
    with pytest.raises(ValueError) as e:
        declare(8, 3)
    assert "EPCOMM_RANKS_PER_NODE=3" in str(e.value) and "8 ranks" in str(e.value)
    with pytest.raises(ValueError, match="ranks_per_node=5 does not divide the group's 4"):
        declare(4, 5, "ranks_per_node")


@pytest.mark.parametrize("n", [0, -2, 1.5, "2", True])
def test_declared_nodes_need_a_positive_int(n):
    with pytest.raises(ValueError, match=KNOB):
        declare(4, n)


@pytest.mark.parametrize("raw", ["-1", "two", "2.0"])
def test_the_knob_rejects_what_is_not_a_count(monkeypatch, raw):
    monkeypatch.setenv(KNOB, raw)
    with pytest.raises(ValueError, match=KNOB):
        envs.RANKS_PER_NODE.get()
    with pytest.raises(ValueError, match=KNOB):
        envs.check_all()
    # discover reads it before any exchange: the rank raises instead of joining the collective
    with pytest.raises(ValueError, match=KNOB):
        discover(ListGroup(0, 2), 0)


def test_the_knob_reads_zero_as_discover(monkeypatch):
    assert envs.RANKS_PER_NODE.get() == 0
    monkeypatch.setenv(KNOB, "0")
    assert envs.RANKS_PER_NODE.get() == 0
    monkeypatch.setenv(KNOB, "4")
    assert envs.RANKS_PER_NODE.get() == 4


# ---- discovery: the pure rule -----------------------------------------------------------------

def full(n):
    return [[1] * n for _ in range(n)]


def test_one_host_is_one_node():
    assert from_hosts(["a"] * 4, full(4)) == Topology(4, 4)
    assert from_hosts(["a"], [[1]]) == Topology(1, 1)


def test_two_hosts_of_four():
    t = from_hosts(["a"] * 4 + ["b"] * 4, full(8))
    assert t == Topology(8, 4) and t.spans_nodes and not t.declared


def test_peer_access_across_hosts_is_not_read():
    reach = full(4)
    reach[0][3] = reach[3][0] = 0  # different hosts: what the rows say there does not matter
    assert from_hosts(["a", "a", "b", "b"], reach) == Topology(4, 2)


def test_interleaved_hosts_are_refused_naming_each_hosts_ranks():
    with pytest.raises(ValueError) as e:
        from_hosts(["h0", "h1"] * 4, full(8))
    msg = str(e.value)
    assert "h0: [0, 2, 4, 6]" in msg and "h1: [1, 3, 5, 7]" in msg and KNOB in msg


def test_unequal_hosts_are_refused():
    with pytest.raises(ValueError) as e:
        from_hosts(["a"] * 3 + ["b"] * 5, full(8))
    assert "a: [0-2]" in str(e.value) and "b: [3-7]" in str(e.value)


def test_a_host_of_two_gpu_islands_is_split_into_nodes():
    # 4 GPUs on one host, {0, 1} and {2, 3} with peer access inside but not across
    reach = full(4)
    for a in (0, 1):
        for b in (2, 3):
            reach[a][b] = reach[b][a] = 0
    assert from_hosts(["a"] * 4, reach) == Topology(4, 2)
    # islands {0, 2} and {1, 3}: interleaved, named as groups of the host
    reach = [[int(a % 2 == b % 2) for b in range(4)] for a in range(4)]
    with pytest.raises(ValueError) as e:
        from_hosts(["a"] * 4, reach)
    assert "a (GPU group 0): [0, 2]" in str(e.value) and "a (GPU group 1): [1, 3]" in str(e.value)


def test_peer_access_one_way_only_does_not_join_a_node():
    reach = full(2)
    reach[1][0] = 0
    assert from_hosts(["a", "a"], reach) == Topology(2, 1)


def test_gpus_that_do_not_split_into_cliques_are_refused():
    # 0 reaches 1, 1 reaches 2, but 0 does not reach 2
    reach = full(3)
    reach[0][2] = reach[2][0] = 0
    with pytest.raises(ValueError, match=r"host a: the GPUs of ranks 0 and 2 do not reach each other"):
        from_hosts(["a"] * 3, reach)


def test_a_malformed_reachability_matrix_is_refused():
    with pytest.raises(ValueError, match="2 x 2"):
        from_hosts(["a", "a"], [[1, 1]])


# ---- discovery: the collective, ranks as threads over a fake driver ---------------------------

class Shared:
    def __init__(self, n):
        self.slots = [b""] * n
        self.gate = threading.Barrier(n, timeout=10)
        self.rounds = 0


class ThreadGroup:
    """Rank ``rank`` of a group whose ranks are threads of this process."""

    def __init__(self, shared: Shared, rank: int):
        self.shared, self.rank, self.size = shared, rank, len(shared.slots)

    def allgather_bytes(self, data: bytes) -> list:
        self.shared.slots[self.rank] = bytes(data)
        self.shared.gate.wait()
        out = list(self.shared.slots)
        if self.rank == 0:
            self.shared.rounds += 1
        self.shared.gate.wait()
        return out

    def barrier(self):
        self.shared.gate.wait()


class ListGroup(FakeGroup):
    """Rank ``rank`` of ``size``, whose all-gathers return ``answers`` in turn."""

    def __init__(self, rank=0, size=2, answers=()):
        super().__init__(rank, size)
        self.answers, self.sent = list(answers), []

    def allgather_bytes(self, data):
        self.sent.append(bytes(data))
        return self.answers.pop(0)


class FakeMachine:
    """GPUs numbered across hosts: GPU g has bus id 0000:<g>:00.0; ``hidden`` GPUs are not
    visible to any process; ``no_peer`` holds (a, b) pairs without peer access from a to b."""

    def __init__(self, monkeypatch, hidden=(), no_peer=()):
        self.hidden, self.no_peer, self.asked = set(hidden), set(no_peer), []
        self.local = threading.local()
        monkeypatch.setattr(socket, "gethostname", lambda: self.local.host)
        monkeypatch.setattr(driver, "pci_bus_id", lambda g: f"0000:{g:02x}:00.0")
        monkeypatch.setattr(driver, "device_by_pci_bus_id", self.by_bus)
        monkeypatch.setattr(driver, "can_access_peer", self.can_access)

    def by_bus(self, bus):
        g = int(bus[5:7], 16)
        return None if g in self.hidden else g

    def can_access(self, a, b):
        self.asked.append((a, b))
        assert a != b
        return (a, b) not in self.no_peer

    def run(self, hosts, gpus, env=None, **kw):
        """discover() on one thread per rank (host hosts[r], GPU gpus[r], EPCOMM_RANKS_PER_NODE
        env[r] as each rank reads it); each rank's Topology or exception, and the rounds."""
        n = len(hosts)
        shared, out = Shared(n), [None] * n
        knob_get = envs.RANKS_PER_NODE.get

        def rank_main(r):
            self.local.host = hosts[r]
            self.local.env = None if env is None else env[r]
            try:
                out[r] = discover(ThreadGroup(shared, r), gpus[r], **kw)
            except Exception as e:  # noqa: BLE001 - compared by the test
                out[r] = e

        def per_rank_knob():
            return knob_get() if getattr(self.local, "env", None) is None else self.local.env

        with pytest.MonkeyPatch.context() as mp:
            # the knob as each rank's thread reads it, where env gives ranks different values
            mp.setattr(topology.envs, "RANKS_PER_NODE", _PerRankKnob(per_rank_knob))
            threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(20)
        return out, shared.rounds


class _PerRankKnob:
    def __init__(self, get):
        self.get = get


def test_discover_two_hosts_of_two(monkeypatch):
    m = FakeMachine(monkeypatch)
    out, rounds = m.run(["a", "a", "b", "b"], [0, 1, 2, 3])
    assert out == [Topology(4, 2)] * 4 and rounds == 2
    # each rank asked only about the other GPU of its host
    assert sorted(m.asked) == [(0, 1), (1, 0), (2, 3), (3, 2)]


def test_discover_splits_a_host_whose_gpus_do_not_reach_each_other(monkeypatch):
    m = FakeMachine(monkeypatch, no_peer={(0, 2), (2, 0), (0, 3), (3, 0), (1, 2), (2, 1), (1, 3), (3, 1)})
    out, _ = m.run(["a"] * 4, [0, 1, 2, 3])
    assert out == [Topology(4, 2)] * 4


def test_discover_refuses_interleaved_hosts_on_every_rank(monkeypatch):
    m = FakeMachine(monkeypatch)
    out, _ = m.run(["a", "b", "a", "b"], [0, 1, 2, 3])
    assert all(isinstance(e, ValueError) and "a: [0, 2]" in str(e) and "b: [1, 3]" in str(e) for e in out), out


def test_ranks_sharing_a_gpu_reach_each_other(monkeypatch):
    m = FakeMachine(monkeypatch, no_peer={(0, 0)})
    out, _ = m.run(["a", "a"], [0, 0])
    assert out == [Topology(2, 2)] * 2 and m.asked == []


def test_a_gpu_hidden_from_this_process_counts_as_reachable(monkeypatch):
    m = FakeMachine(monkeypatch, hidden={1}, no_peer={(1, 0)})
    out, _ = m.run(["a", "a"], [0, 1])
    # rank 0 cannot ask about GPU 1; rank 1 asks about GPU 0 (allowed only one way here: (1, 0) denied)
    assert m.asked == [(1, 0)]
    assert out == [Topology(2, 1)] * 2
    m2 = FakeMachine(monkeypatch, hidden={0, 1})
    out, _ = m2.run(["a", "a"], [0, 1])
    assert out == [Topology(2, 2)] * 2 and m2.asked == []


def test_discover_with_declared_nodes(monkeypatch):
    m = FakeMachine(monkeypatch)
    monkeypatch.setenv(KNOB, "1")
    out, rounds = m.run(["a", "a"], [0, 0])
    assert out == [Topology(2, 1, declared=True)] * 2 and rounds == 1 and m.asked == []
    monkeypatch.delenv(KNOB)
    out, _ = m.run(["a"] * 4, [0, 1, 2, 3], ranks_per_node=2)
    assert out == [Topology(4, 2, declared=True)] * 4


def test_discover_refuses_declared_nodes_that_do_not_divide_the_group(monkeypatch):
    m = FakeMachine(monkeypatch)
    monkeypatch.setenv(KNOB, "4")
    out, _ = m.run(["a"] * 6, list(range(6)))
    assert all(isinstance(e, ValueError) and "EPCOMM_RANKS_PER_NODE=4" in str(e) and "6 ranks" in str(e)
               for e in out), out


def test_discover_refuses_ranks_that_declare_differently(monkeypatch):
    m = FakeMachine(monkeypatch)
    out, _ = m.run(["a"] * 4, [0, 1, 2, 3], env=[2, 2, 0, 2])
    assert all(isinstance(e, ValueError) and "[2, 2, 0, 2]" in str(e) for e in out), out


def test_a_declared_node_must_lie_on_one_host(monkeypatch):
    m = FakeMachine(monkeypatch)
    monkeypatch.setenv(KNOB, "4")
    out, _ = m.run(["a", "a", "b", "b"], [0, 1, 2, 3])
    assert all(isinstance(e, ValueError) and "spans hosts ['a', 'b']" in str(e) for e in out), out


def test_discover_rejects_a_bad_argument():
    with pytest.raises(ValueError, match="ranks_per_node"):
        discover(ListGroup(0, 2), 0, ranks_per_node=0)


# ---- the driver calls discovery makes, over a stand-in for cuda.bindings ----------------------

class _Drv:
    """What cuda.bindings.driver returned on an H100 for these calls (codes as there)."""

    class CUresult:
        CUDA_SUCCESS, CUDA_ERROR_INVALID_VALUE, CUDA_ERROR_INVALID_DEVICE, CUDA_ERROR_NOT_INITIALIZED = 0, 1, 101, 3

    def __init__(self, by_bus_code=0):
        self.by_bus_code = by_bus_code

    def cuDeviceGet(self, i):
        return (0, i)

    def cuDeviceGetPCIBusId(self, n, dev):
        return (0, b"0000:00:06.0\x00" + b" " * 19)  # the whole buffer: NUL, then filler

    def cuDeviceGetByPCIBusId(self, bus):
        if self.by_bus_code:
            return (self.by_bus_code, 0)
        return (0, 3) if bus == b"0000:00:06.0" else (self.CUresult.CUDA_ERROR_INVALID_DEVICE, 0)

    def cuGetErrorName(self, err):
        return (0, b"CUDA_ERROR_NOT_INITIALIZED")


def test_pci_bus_ids_and_devices_by_bus_id(monkeypatch):
    monkeypatch.setattr(driver, "drv", lambda: _Drv())
    assert driver.pci_bus_id(0) == "0000:00:06.0"
    assert driver.device_by_pci_bus_id("0000:00:06.0") == 3
    assert driver.device_by_pci_bus_id("0000:fe:1f.0") is None  # a GPU this process does not see
    monkeypatch.setattr(driver, "drv", lambda: _Drv(_Drv.CUresult.CUDA_ERROR_INVALID_VALUE))
    assert driver.device_by_pci_bus_id("junk") is None
    monkeypatch.setattr(driver, "drv", lambda: _Drv(_Drv.CUresult.CUDA_ERROR_NOT_INITIALIZED))
    with pytest.raises(EpcommError, match="cuDeviceGetByPCIBusId"):
        driver.device_by_pci_bus_id("0000:00:06.0")


# ---- low-latency peers across declared nodes --------------------------------------------------

HEAPS = [0x1000, 0x2000, 0x3000, 0x4000]


def _links(*rows):
    return np.array([[c == "1" for c in r] for r in rows])


def test_nvlink_links_without_a_topology_keep_mapped_pairs():
    reach = [b"\x01" * 4] * 4
    assert (nvlink_links(reach) == _links("1111", "1111", "1111", "1111")).all()
    assert (nvlink_links(reach, Topology(4, 4)) == _links("1111", "1111", "1111", "1111")).all()


def test_nvlink_links_on_other_declared_nodes_use_puts():
    reach = [b"\x01" * 4] * 4
    assert (nvlink_links(reach, declare(4, 2)) == _links("1100", "1100", "0011", "0011")).all()
    assert (nvlink_links(reach, declare(4, 1)) == _links("1000", "0100", "0010", "0001")).all()


def test_nvlink_links_mapped_one_way_use_puts_both_ways():
    reach = [bytearray(b"\x01" * 4) for _ in range(4)]
    reach[2][0] = 0  # rank 2 does not map rank 0's heap
    assert (nvlink_links(reach) == _links("1101", "1111", "0111", "1111")).all()
    # and the node rule on top of it
    assert (nvlink_links(reach, declare(4, 2)) == _links("1100", "1100", "0011", "0011")).all()
    # a rank always reaches its own heap directly, whatever its reach row says
    reach[1][1] = 0
    assert nvlink_links(reach)[1, 1]


@pytest.mark.parametrize("topo, expect_put", [(None, False), (Topology(4, 2, declared=True), True)])
def test_the_low_latency_engine_reads_the_contexts_topology(monkeypatch, topo, expect_put):
    monkeypatch.delenv("EPCOMM_PROFILE", raising=False)
    monkeypatch.delenv("EPCOMM_LL_FORCE_NVSHMEM_PUT", raising=False)
    monkeypatch.setattr(nvr, "init", lambda *a, **k: None)
    monkeypatch.setattr(nvr, "alloc", lambda n: ("heap", HEAPS[1]))
    monkeypatch.setattr(nvr, "peer_ptr", lambda obj, r: HEAPS[r])  # NVSHMEM maps every peer (one host)
    for name in ("memset_d8_async", "stream_sync"):
        monkeypatch.setattr(driver, name, lambda *a: None)
    monkeypatch.setattr(driver, "mem_alloc", lambda n: 0x9000)
    monkeypatch.setattr(ll_state.driver, "on_device", _no_device)
    group = ListGroup(1, 4, answers=[[b"\x01" * 4] * 4])
    ctx = fake_context(4, rank=1, group=group)
    ctx.topology = topo
    st = LowLatencyState(ctx, 1 << 20)
    assert group.sent == [b"\x01" * 4]
    if expect_put:
        assert st.peers == [HEAPS[0], HEAPS[1], 0, 0] and st.template.any_put == 1
    else:
        assert st.peers == HEAPS and st.template.any_put == 0
    assert list(st.template.peer_base)[:4] == st.peers


class _no_device:
    def __init__(self, dev):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
