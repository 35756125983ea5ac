"""Baselines measured in the same run as epcomm's operations: NCCL all-to-all of the same payload
(and of an even split), and the copy engine's peer bandwidth.  ``torch`` is passed in."""
from __future__ import annotations

import tempfile

from epcomm.runtime import driver
from epcomm.tools.bench.accounting import gbps
from epcomm.tools.bench.timing import elapsed_us, events, median, time_op


def nccl_init(torch, rank: int, world: int, group):
    """torch.distributed's NCCL process group of the spawned ranks (rendezvous through a file
    whose name rank 0 sends over ``group``); returns ``torch.distributed``."""
    import torch.distributed as dist
    path = group.broadcast_bytes(tempfile.mktemp(prefix="epcomm-nccl-").encode() if rank == 0 else None).decode()
    dist.init_process_group("nccl", init_method=f"file://{path}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    return dist


def nccl_even_a2a(torch, dist, numel: int, iters: int, align) -> float:
    """all_to_all_single of ``numel`` bf16 split evenly over the ranks (older runs' baseline)."""
    x = torch.randn(numel, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    return median(time_op(torch, lambda: dist.all_to_all_single(y, x), iters, 5, align))


def nccl_a2a_rows(torch, dist, send: list[int], recv: list[int], row_bytes: int, iters: int, align) -> float:
    """all_to_all_single of rows of ``row_bytes`` bytes: ``send[d]`` rows to rank d, ``recv[s]``
    from rank s (the splits of an epcomm operation, so the same payload)."""
    i = torch.randint(0, 256, (sum(send), row_bytes), dtype=torch.uint8, device="cuda")
    o = torch.empty((sum(recv), row_bytes), dtype=torch.uint8, device="cuda")
    return median(time_op(torch, lambda: dist.all_to_all_single(o, i, recv, send), iters, 5, align))


def nccl_same_payload(torch, dist, send, recv, row_bytes: dict, iters: int, align) -> dict:
    """NCCL all-to-all of a normal-mode dispatch's payload and its combine's, in the same GB/s
    accounting (received rows x row bytes / time): ``send[d]`` tokens this rank sends to rank d
    (``num_tokens_per_rank``), ``recv[s]`` rows it receives from rank s (the handle's
    ``recv_counts``); ``row_bytes``: :func:`~epcomm.tools.bench.accounting.normal_row_bytes`.
    Returns ``nccl_dispatch_bf16_us``/``_GBps``, ``nccl_dispatch_fp8_*`` and ``nccl_combine_*``
    (the combine: BF16 rows the other way)."""
    send, recv = [int(v) for v in send], [int(v) for v in recv]
    rows = sum(recv)
    out = {}
    for name in ("bf16", "fp8"):
        t = nccl_a2a_rows(torch, dist, send, recv, row_bytes[name], iters, align)
        out[f"nccl_dispatch_{name}_us"], out[f"nccl_dispatch_{name}_GBps"] = t, gbps(rows * row_bytes[name], t)
    t = nccl_a2a_rows(torch, dist, recv, send, row_bytes["bf16"], iters, align)
    out["nccl_combine_us"], out["nccl_combine_GBps"] = t, gbps(rows * row_bytes["bf16"], t)
    return out


def peer_copy(torch, rank, world, group, nbytes: int, iters: int, align) -> dict:
    """Copy-engine bandwidth into the next rank's memory (CUDA IPC), alone and all at once."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst_local = driver.mem_alloc(nbytes)
    hs = group.allgather_bytes(driver.ipc_get_handle(dst_local))
    peer = driver.ipc_open(hs[(rank + 1) % world])
    stream = torch.cuda.current_stream().cuda_stream
    res = {}

    def copy():
        driver.memcpy_dtod_async(peer, src.data_ptr(), nbytes, stream)

    # Alone: only rank 0 copies, the others wait at the barrier.
    ts = []
    for _ in range(iters):
        torch.cuda.synchronize()
        group.barrier()
        if rank == 0:
            s, e = events(torch)
            s.record(); copy(); e.record(); e.synchronize()
            ts.append(elapsed_us(s, e))
        group.barrier()
    if rank == 0:
        res["unidirectional_GBps"] = nbytes / (median(ts) * 1e-6) / 1e9
    # Everyone at once (each GPU sends and receives).
    ts = time_op(torch, copy, iters, 2, align)
    res["all_ranks_at_once_GBps_per_gpu"] = nbytes / (median(ts) * 1e-6) / 1e9
    torch.cuda.synchronize()
    group.barrier()
    driver.ipc_close(peer)
    driver.mem_free(dst_local)
    return res
