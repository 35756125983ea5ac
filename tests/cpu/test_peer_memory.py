"""The NVLink buffer's sharing between processes (epcomm.runtime.peer_memory) and the descriptor
passing under it (epcomm.runtime.fdpass), on the CPU: real Unix sockets between real processes
and threads; the CUDA driver's virtual-memory calls replaced by a recorder."""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import threading

import pytest

from epcomm.errors import EpcommError, EpcommTimeoutError
from epcomm.runtime import fdpass, peer_memory, vmm
from epcomm.runtime.group.files import FileGroup


class ThreadGroup:
    """The group of one thread among ``size`` threads of this process."""

    def __init__(self, shared, rank: int):
        self.rank, self.size = rank, shared["size"]
        self._shared = shared

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        s = self._shared
        s["slots"][self.rank] = bytes(data)
        s["barrier"].wait(timeout=20)
        out = list(s["slots"])
        s["barrier"].wait(timeout=20)
        return out

    def barrier(self) -> None:
        self._shared["barrier"].wait(timeout=20)


def thread_groups(size: int) -> list[ThreadGroup]:
    shared = {"size": size, "slots": [b""] * size, "barrier": threading.Barrier(size)}
    return [ThreadGroup(shared, r) for r in range(size)]


def run_ranks(fn, size: int):
    """fn(group) on ``size`` threads; returns the results by rank, raising the first error."""
    groups, out, errs = thread_groups(size), [None] * size, []

    def body(g):
        try:
            out[g.rank] = fn(g)
        except BaseException as e:  # noqa: BLE001 - reported below
            errs.append(e)
            g._shared["barrier"].abort()

    ts = [threading.Thread(target=body, args=(g,)) for g in groups]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    if errs:
        raise errs[0]
    return out


def _open_fds() -> set[int]:
    return {int(f) for f in os.listdir("/proc/self/fd")}


# ---------------------------------------------------------------------------- fdpass

def _proc_exchange(path, rank, size, q):
    g = FileGroup(path, rank, size, timeout_s=30)
    fd = os.memfd_create(f"r{rank}")
    os.write(fd, f"memory of rank {rank}".encode())
    got = fdpass.exchange_fds(g, fd, range(size), "test", 30)
    os.close(fd)
    seen = {}
    for r, f in got.items():
        # pread: the receivers of one descriptor share its open file (and its offset)
        seen[r] = os.pread(f, 64, 0).decode()
        os.close(f)
    q.put((rank, seen))


@pytest.mark.parametrize("size", [2, 4])
def test_exchange_fds_between_processes(tmp_path, size):
    """Each process receives every other process's descriptor, by rank, and reads what the
    sender wrote behind it (the same open file, not a copy)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=_proc_exchange, args=(str(tmp_path / "g"), r, size, q)) for r in range(size)]
    for p in ps:
        p.start()
    res = dict(q.get(timeout=60) for _ in ps)
    for p in ps:
        p.join(30)
        assert p.exitcode == 0
    for r in range(size):
        assert res[r] == {p: f"memory of rank {p}" for p in range(size) if p != r}


def test_exchange_fds_more_peers_than_a_socket_queue(tmp_path):
    """12 ranks (threads): each receiver is sent 11 messages, more than Linux's default datagram
    queue (10): the sends and receives interleave instead of waiting on each other."""
    def body(g):
        fd = os.memfd_create(f"r{g.rank}")
        os.write(fd, bytes([g.rank]))
        got = fdpass.exchange_fds(g, fd, range(g.size), "queue", 30)
        os.close(fd)
        vals = {}
        for p, f in got.items():
            vals[p] = os.pread(f, 1, 0)[0]
            os.close(f)
        return vals

    before = _open_fds()
    out = run_ranks(body, 12)
    for rank, vals in enumerate(out):
        assert vals == {p: p for p in range(12) if p != rank}
    assert _open_fds() == before


def test_exchange_fds_unreachable_or_silent_peer():
    """A peer that bound no socket: the sender says it cannot reach it (EpcommError naming the
    rank and the way out); a peer that binds one but never sends: EpcommTimeoutError names it."""
    import time
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(fdpass._address("t0", "test", 0))
    sock.setblocking(False)
    r, w = os.pipe()
    try:
        with pytest.raises(EpcommError, match="rank 1.*EPCOMM_PEER_MEMORY=ipc"):
            fdpass._pump(sock, 0, r, [1], "t0", "test", {}, time.monotonic() + 5, 5.0)
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        silent.bind(fdpass._address("t0", "test", 1))
        try:
            t0 = time.monotonic()
            with pytest.raises(EpcommTimeoutError, match=r"after 0.3 s .*no handle from ranks \[1\]") as ei:
                fdpass._pump(sock, 0, r, [1], "t0", "test", {}, time.monotonic() + 0.3, 0.3)
            assert 0.25 < time.monotonic() - t0 < 3
            assert ei.value.peer == 1 and ei.value.phase == "peer memory exchange"
            _, fds, _, _ = socket.recv_fds(silent, 4, 1)  # what rank 0 sent did arrive
            assert len(fds) == 1
            os.close(fds[0])
        finally:
            silent.close()
    finally:
        sock.close()
        os.close(r)
        os.close(w)


def test_exchange_fds_drops_strangers():
    """A message from a rank not expected, or a second one from the same rank, is closed, not
    kept."""
    got: dict = {}
    r, w = os.pipe()
    fdpass._take(fdpass._HEADER.pack(1), [os.dup(r)], [1, 2], got)
    extra = [os.dup(r), os.dup(r)]
    fdpass._take(fdpass._HEADER.pack(1), [extra[0]], [1, 2], got)   # repeated sender
    fdpass._take(fdpass._HEADER.pack(5), [extra[1]], [1, 2], got)   # not a peer
    assert list(got) == [1]
    for f in extra:
        with pytest.raises(OSError):
            os.fstat(f)
    os.close(got[1])
    os.close(r)
    os.close(w)


# ---------------------------------------------------------------------------- PeerMemory (vmm)

class FakeVmm:
    """Records the virtual-memory calls; an allocation's descriptor is a memfd that says which
    allocation it is, so an import can tell whose memory it got."""

    def __init__(self, fail_map_after: int | None = None):
        self.lock = threading.Lock()
        self.live_handles: dict[int, str] = {}
        self.mapped: dict[int, tuple[int, int]] = {}   # address -> (handle, bytes)
        self.next = 1
        self.fail_map_after = fail_map_after
        self.maps = 0

    def _new(self, what):
        with self.lock:
            h = self.next
            self.next += 1
            self.live_handles[h] = what
            return h

    def install(self, monkeypatch):
        monkeypatch.setattr(vmm, "check_supported", lambda dev: None)
        monkeypatch.setattr(vmm, "rounded", lambda n, dev: -(-n // 4096) * 4096)
        monkeypatch.setattr(vmm, "create", lambda n, dev: self._new(f"alloc{dev}:{n}"))
        monkeypatch.setattr(vmm, "export_fd", self.export_fd)
        monkeypatch.setattr(vmm, "import_fd", self.import_fd)
        monkeypatch.setattr(vmm, "map_rw", self.map_rw)
        monkeypatch.setattr(vmm, "unmap", self.unmap)
        monkeypatch.setattr(vmm, "release", self.release)

    def export_fd(self, handle):
        fd = os.memfd_create("alloc")
        os.write(fd, self.live_handles[handle].encode())
        return fd

    def import_fd(self, fd):
        return self._new("imported:" + os.pread(fd, 64, 0).decode())

    def map_rw(self, handle, n, dev):
        with self.lock:
            self.maps += 1
            if self.fail_map_after is not None and self.maps > self.fail_map_after:
                raise EpcommError("CUDA driver call cuMemMap failed: CUDA_ERROR_OUT_OF_MEMORY")
            addr = 0x1000_0000 * handle
            self.mapped[addr] = (handle, n)
            return addr

    def unmap(self, ptr, n):
        with self.lock:
            assert self.mapped.pop(ptr)[1] == n

    def release(self, handle):
        with self.lock:
            del self.live_handles[handle]


def test_peer_memory_vmm_maps_every_peer_and_frees_everything(monkeypatch):
    fake = FakeVmm()
    fake.install(monkeypatch)
    before = _open_fds()

    def body(g):
        m = peer_memory.PeerMemory(0, 10_000 + g.rank, kind="vmm")
        ptrs = m.share(g, timeout_s=20)
        return m, ptrs

    out = run_ranks(body, 3)
    for rank, (m, ptrs) in enumerate(out):
        assert m.size == 12288 and ptrs[rank] == m.local and len(set(ptrs)) == 3
        imported = [fake.live_handles[fake.mapped[p][0]] for r, p in enumerate(ptrs) if r != rank]
        assert imported == ["imported:alloc0:12288"] * 2
    assert len(fake.mapped) == 9 and len(fake.live_handles) == 9
    assert _open_fds() == before, "every exported and received descriptor is closed after the import"
    for m, _ in out:
        m.free()
        m.free()  # twice: nothing left to undo
    assert fake.mapped == {} and fake.live_handles == {}


def test_peer_memory_vmm_failure_midway_leaves_nothing(monkeypatch):
    """A mapping that fails in share(): the error propagates, and free() (as NvlinkState's
    constructor calls it) undoes what was mapped: no handle, mapping or descriptor left."""
    fake = FakeVmm(fail_map_after=3)  # 2 local maps, 1 peer's, then the next fails
    fake.install(monkeypatch)
    before = _open_fds()
    made = []

    def body(g):
        m = peer_memory.PeerMemory(0, 4096, kind="vmm")
        made.append(m)
        m.share(g, timeout_s=20)

    with pytest.raises(EpcommError, match="cuMemMap"):
        run_ranks(body, 2)
    for m in made:
        m.free()
    assert fake.mapped == {} and fake.live_handles == {}
    assert _open_fds() == before


def test_peer_memory_kinds_must_agree(monkeypatch):
    fake = FakeVmm()
    fake.install(monkeypatch)
    monkeypatch.setattr(peer_memory.driver, "mem_alloc", lambda n: 0xABC000)
    monkeypatch.setattr(peer_memory.driver, "mem_free", lambda p: None)
    made = []

    def body(g):
        m = peer_memory.PeerMemory(0, 4096, kind="vmm" if g.rank else "ipc")
        made.append(m)
        m.share(g, timeout_s=5)

    with pytest.raises(ValueError, match=r"EPCOMM_PEER_MEMORY must agree on all ranks, got \['ipc', 'vmm'\]"):
        run_ranks(body, 2)
    for m in made:
        m.free()
    assert fake.live_handles == {}


def test_peer_memory_kind_from_the_knob(monkeypatch):
    monkeypatch.setenv("EPCOMM_PEER_MEMORY", "VMM")
    fake = FakeVmm()
    fake.install(monkeypatch)
    m = peer_memory.PeerMemory(0, 1)
    assert m.kind == "vmm" and m.size == 4096
    m.free()
    monkeypatch.setenv("EPCOMM_PEER_MEMORY", "nvshmem")
    with pytest.raises(ValueError, match="EPCOMM_PEER_MEMORY='nvshmem': expected 'ipc' or 'vmm'"):
        peer_memory.PeerMemory(0, 1)
