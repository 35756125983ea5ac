"""The nodes of a group: which ranks reach each other's GPUs directly (peer pointers), and which
only over the network.

A node is a set of ranks on one host whose GPUs all reach each other (peer access); every rank
is on exactly one node.  The kernels of the modes that span nodes address the rank of the same
local index on another node as ``node * P + local`` (``P`` ranks per node), so nodes must be
equal blocks of consecutive ranks; :func:`discover` raises where they are not.
``EPCOMM_RANKS_PER_NODE`` (or ``discover``'s ``ranks_per_node``) declares the nodes instead, so
the paths across nodes can run on one host, or on one GPU shared by several ranks in tests.
"""
from __future__ import annotations

import json
import socket
from dataclasses import dataclass

from epcomm import envs
from epcomm.runtime import driver
from epcomm.validate import check_int


@dataclass(frozen=True)
class Topology:
    """``num_ranks`` ranks in nodes of ``ranks_per_node`` consecutive ranks: rank ``r`` is local
    rank ``r % ranks_per_node`` of node ``r // ranks_per_node``.  ``declared``: the nodes were
    declared (EPCOMM_RANKS_PER_NODE), not discovered.  ValueError unless ``ranks_per_node`` is in
    [1, num_ranks] and divides ``num_ranks``."""
    num_ranks: int
    ranks_per_node: int
    declared: bool = False

    def __post_init__(self):
        check_int("num_ranks", self.num_ranks, lo=1)
        check_int("ranks_per_node", self.ranks_per_node, lo=1, hi=self.num_ranks)
        if self.num_ranks % self.ranks_per_node:
            raise ValueError(f"ranks_per_node={self.ranks_per_node} does not divide num_ranks={self.num_ranks}")

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.ranks_per_node

    @property
    def spans_nodes(self) -> bool:
        """More than one node: some pairs of ranks reach each other only over the network."""
        return self.num_nodes > 1

    def _rank(self, rank) -> int:
        return check_int("rank", rank, lo=0, hi=self.num_ranks - 1)

    def node_of(self, rank: int) -> int:
        return self._rank(rank) // self.ranks_per_node

    def local_of(self, rank: int) -> int:
        """``rank``'s index within its node."""
        return self._rank(rank) % self.ranks_per_node

    def rank_of(self, node: int, local: int) -> int:
        """The rank of local index ``local`` on ``node``: ``node * ranks_per_node + local``."""
        node = check_int("node", node, lo=0, hi=self.num_nodes - 1)
        return node * self.ranks_per_node + check_int("local", local, lo=0, hi=self.ranks_per_node - 1)

    def node_ranks(self, node: int) -> range:
        """The ranks of ``node``, in local order."""
        node = check_int("node", node, lo=0, hi=self.num_nodes - 1)
        return range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node)

    def same_node(self, a: int, b: int) -> bool:
        return self.node_of(a) == self.node_of(b)


def _ranks_text(ranks) -> str:
    """``[0, 1, 2, 5]`` as ``[0-2, 5]``."""
    runs: list[list[int]] = []
    for r in sorted(ranks):
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return "[" + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) + "]"


def declare(num_ranks: int, ranks_per_node, source: str = "EPCOMM_RANKS_PER_NODE") -> Topology:
    """Declared nodes of ``ranks_per_node`` consecutive ranks.  ValueError, naming ``source`` (the
    knob or argument the number came from) and both numbers, unless it is an int >= 1 that
    divides ``num_ranks``."""
    if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int):
        raise ValueError(f"{source}={ranks_per_node!r}: expected an integer >= 1")
    if ranks_per_node < 1:
        raise ValueError(f"{source}={ranks_per_node}: ranks per node must be >= 1")
    if num_ranks % ranks_per_node:
        raise ValueError(f"{source}={ranks_per_node} does not divide the group's {num_ranks} ranks: nodes must "
                         f"be equal blocks of consecutive ranks")
    return Topology(num_ranks, ranks_per_node, declared=True)


def from_hosts(hosts: list[str], reach) -> Topology:
    """The discovered nodes (pure: what :func:`discover` gathered).  ``hosts[r]``: rank r's host
    name; ``reach[r][q]``: rank r's GPU can access rank q's (read for ranks of one host only; a
    rank sharing r's GPU counts as reachable).

    A host's ranks form one node when their GPUs all reach each other both ways.  A host whose
    GPUs fall apart into groups that do not reach each other (e.g. two NVLink islands without
    PCIe peer access) is split into one node per group, each group's GPUs reaching each other;
    ValueError when reachability does not split it so (rank a reaches b and b reaches c, but a
    does not reach c).  ValueError also unless the nodes are equal blocks of consecutive ranks
    (``rank = node * P + local``), naming each node's ranks and EPCOMM_RANKS_PER_NODE."""
    n = len(hosts)
    if n < 1 or len(reach) != n or any(len(row) != n for row in reach):
        raise ValueError(f"from_hosts: {n} host names need a {n} x {n} reachability matrix")

    def mutual(a: int, b: int) -> bool:
        return bool(reach[a][b]) and bool(reach[b][a])

    by_host: dict[str, list[int]] = {}
    for r, h in enumerate(hosts):
        by_host.setdefault(h, []).append(r)
    nodes: list[tuple[str, list[int]]] = []
    for host, ranks in by_host.items():
        groups: list[list[int]] = []
        left = list(ranks)
        while left:
            # Ranks connected to the first one through mutual peer access; each group must be a
            # clique, or no split gives nodes whose GPUs all reach each other.
            group, todo = [left[0]], [left[0]]
            while todo:
                a = todo.pop()
                for b in left:
                    if b not in group and mutual(a, b):
                        group.append(b)
                        todo.append(b)
            group.sort()
            for i, a in enumerate(group):
                for b in group[i + 1:]:
                    if not mutual(a, b):
                        raise ValueError(
                            f"host {host}: the GPUs of ranks {a} and {b} do not reach each other (peer access), "
                            f"though both are joined through other GPUs of ranks {_ranks_text(group)}; a node's "
                            f"GPUs must all reach each other (EPCOMM_RANKS_PER_NODE can declare nodes)")
            groups.append(group)
            left = [r for r in left if r not in group]
        for i, group in enumerate(groups):
            nodes.append((host if len(groups) == 1 else f"{host} (GPU group {i})", group))
    nodes.sort(key=lambda hn: hn[1][0])
    per_node = len(nodes[0][1])
    if any(ranks != list(range(i * per_node, (i + 1) * per_node)) for i, (_, ranks) in enumerate(nodes)):
        found = "; ".join(f"{host}: {_ranks_text(ranks)}" for host, ranks in nodes)
        raise ValueError(f"the group's nodes must be equal blocks of consecutive ranks (rank = node * "
                         f"ranks_per_node + local), but found {found}; order the ranks node by node, or set "
                         f"EPCOMM_RANKS_PER_NODE to declare nodes")
    return Topology(n, per_node)


def _reach_row(device_id: int, rank: int, hosts: list[str], buses: list[str]) -> bytes:
    """This rank's row of the reachability matrix: 1 for each rank of this host whose GPU this
    one can access (its own GPU included), 0 elsewhere."""
    row = bytearray(len(hosts))
    for q, (host, bus) in enumerate(zip(hosts, buses)):
        if host != hosts[rank]:
            continue
        if bus == buses[rank]:
            row[q] = 1
            continue
        peer = driver.device_by_pci_bus_id(bus)
        # A GPU this process does not see (CUDA_VISIBLE_DEVICES) cannot be asked about: the host
        # decides, and mapping its memory later fails if it is not reachable after all.
        row[q] = 1 if peer is None else int(driver.can_access_peer(device_id, peer))
    return bytes(row)


def discover(group, device_id: int, *, ranks_per_node: int | None = None) -> Topology:
    """The nodes of ``group`` (collective: every rank calls it, with its GPU ``device_id``, after
    ``driver.init()``).

    ``ranks_per_node`` (else EPCOMM_RANKS_PER_NODE, unless 0) declares nodes of that many
    consecutive ranks: ValueError unless it is >= 1 and divides the group's size, or if a
    declared node spans two hosts.  Otherwise the ranks' host names and GPUs' PCI bus ids are
    all-gathered, each rank checks peer access to the GPUs of the other ranks of its host, and
    :func:`from_hosts` makes the nodes of what was gathered (ValueError as it says).  Every rank
    must declare the same number (ValueError on every rank otherwise), and every rank raises
    alike, since each decides on the same gathered values."""
    if ranks_per_node is None:
        n, source = envs.RANKS_PER_NODE.get(), "EPCOMM_RANKS_PER_NODE"
    else:
        n, source = check_int("ranks_per_node", ranks_per_node, lo=1), "ranks_per_node"
    me = json.dumps([n, socket.gethostname(), driver.pci_bus_id(device_id)]).encode()
    got = [json.loads(b) for b in group.allgather_bytes(me)]
    numbers, hosts, buses = ([g[i] for g in got] for i in range(3))
    if len(set(numbers)) != 1:
        raise ValueError(f"ranks declare different nodes: {source} (0: discover) per rank: {numbers}")
    if n:
        topo = declare(group.size, n, source)
        for node in range(topo.num_nodes):
            on = sorted({hosts[r] for r in topo.node_ranks(node)})
            if len(on) > 1:
                raise ValueError(f"{source}={n}: node {node} (ranks {_ranks_text(topo.node_ranks(node))}) spans "
                                 f"hosts {on}; a declared node must lie on one host")
        return topo
    reach = group.allgather_bytes(_reach_row(device_id, group.rank, hosts, buses))
    return from_hosts(hosts, reach)
