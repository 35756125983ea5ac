"""Passing file descriptors between the processes of one host (Unix datagram sockets, SCM_RIGHTS).

Each rank binds a datagram socket in Linux's abstract namespace under a name made of a random
token (rank 0's, shared through the group), the purpose and its rank; after a barrier every
rank sends its descriptor to each peer and receives one from each.  The kernel duplicates a
descriptor into the receiver, so what each process holds afterwards is its own.  Abstract
sockets leave no file behind and need no shared directory, but only processes of one network
namespace see them (containers that share a host but not a network namespace do not).
"""
from __future__ import annotations

import array
import os
import select
import socket
import struct
import time
from typing import Sequence

from epcomm.errors import EpcommError, EpcommTimeoutError

_HEADER = struct.Struct("<i")


def _address(token: str, purpose: str, rank: int) -> bytes:
    return f"\0epcomm-{purpose}-{token}-{rank}".encode()


def exchange_fds(group, fd: int, peers: Sequence[int], purpose: str, timeout_s: float) -> dict[int, int]:
    """Send ``fd`` to every rank in ``peers`` and receive one descriptor from each (collective
    over ``group``: every rank calls it, each with its own peers, which must be symmetric: a
    rank lists r exactly when r lists it).  Returns {peer rank: descriptor}, owned by the
    caller (close them).  ``purpose`` tells apart exchanges that may overlap in time.

    Raises EpcommTimeoutError naming the ranks whose descriptor did not arrive within
    ``timeout_s``, and EpcommError if a peer's socket cannot be reached (not one network
    namespace); descriptors already received are closed first.
    """
    peers = sorted(set(int(p) for p in peers) - {group.rank})
    token = group.allgather_bytes(os.urandom(8).hex().encode())[0].decode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    got: dict[int, int] = {}
    try:
        sock.bind(_address(token, purpose, group.rank))
        sock.setblocking(False)
        group.barrier()  # every socket is bound before anyone sends
        _pump(sock, group.rank, fd, peers, token, purpose, got, time.monotonic() + timeout_s, timeout_s)
    except BaseException:
        for f in got.values():
            os.close(f)
        raise
    finally:
        sock.close()
    return got


def _pump(sock, rank, fd, peers, token, purpose, got, deadline, timeout_s) -> None:
    """Send to the peers and receive from them, interleaved: a receiver's queue is bounded
    (net.unix.max_dgram_qlen), so a rank that only sent could wait on a peer that only sends."""
    to_send = list(peers)
    while to_send or len(got) < len(peers):
        progressed = False
        while to_send:
            try:
                # sendmsg, not socket.send_fds, which drops its address argument (CPython 3.11).
                sock.sendmsg([_HEADER.pack(rank)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))],
                             0, _address(token, purpose, to_send[0]))
            except (BlockingIOError, InterruptedError):
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise EpcommError(
                    f"rank {rank}: cannot pass a memory handle to rank {to_send[0]} over a Unix socket "
                    f"({type(exc).__name__}: {exc}); the ranks of one host must share a network namespace "
                    f"for EPCOMM_PEER_MEMORY=vmm (set EPCOMM_PEER_MEMORY=ipc otherwise)") from exc
            to_send.pop(0)
            progressed = True
        while len(got) < len(peers):
            try:
                msg, fds, _, _ = socket.recv_fds(sock, _HEADER.size, 1)
            except (BlockingIOError, InterruptedError):
                break
            _take(msg, fds, peers, got)
            progressed = True
        if progressed:
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            missing = [p for p in peers if p not in got]
            raise EpcommTimeoutError(
                f"rank {rank}: timed out after {timeout_s:g} s passing memory handles; no handle from "
                f"ranks {missing}" + (f", and ranks {to_send} did not take ours" if to_send else ""),
                rank=rank, phase="peer memory exchange", peer=missing[0] if missing else to_send[0])
        # Writability says nothing of a peer's full queue: retry the sends after a short sleep.
        select.select([sock], [], [], min(left, 0.005 if to_send else 0.05))


def _take(msg: bytes, fds: list[int], peers: Sequence[int], got: dict[int, int]) -> None:
    """Keep the descriptor of one message; close any that is not one expected peer's first."""
    sender = _HEADER.unpack(msg)[0] if len(msg) == _HEADER.size else -1
    if len(fds) == 1 and sender in peers and sender not in got:
        got[sender] = fds[0]
        return
    for f in fds:
        os.close(f)
