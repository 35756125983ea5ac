"""The internode worker of ``epcomm bench``: the normal mode across nodes declared on this host
(EPCOMM_RANKS_PER_NODE, which the driver sets from ``--ranks-per-node``).  The BF16 dispatch, the
FP8 dispatch and the combine at the Buffer's default config, timed, then checked against
epcomm.reference (the combine in node-first order); per rank the rows of the route, between
nodes and over NVLink inside a node, with their GB/s; the NCCL all-to-all of the same payload,
unless ranks share a GPU (NCCL refuses that; the timings then mean nothing anyway)."""
from __future__ import annotations

import epcomm
from epcomm import envs
from epcomm.tools.bench import defaults as D
from epcomm.tools.bench.accounting import gbps, internode_op_rates, internode_route_rows, normal_row_bytes
from epcomm.tools.bench.baselines import nccl_same_payload
from epcomm.tools.bench.checks import NormalCheck, gatherer, record_check
from epcomm.tools.bench.timing import measure
from epcomm.tools.bench.worker import Progress, env_seen, finish, normal_inputs, worker_setup

# (name, row format, is the combine): the operations, timed in this order.
OPS = (("dispatch_bf16", "bf16", False), ("dispatch_fp8", "fp8", False), ("combine", "bf16", True))
NCCL_SKIPPED = "not run: ranks share a GPU, and NCCL refuses two ranks on one GPU"


def internode_worker(rank, world, group, args) -> dict:
    """One rank's internode results (``args``: tokens, hidden, topk, experts, iters, aligner,
    ranks_per_node, share_gpu, partial_dir); spawned with
    :data:`~epcomm.tools.bench.worker.WORKER_ENV` and EPCOMM_RANKS_PER_NODE = ranks_per_node.

    Returns ``{"rank", "ranks_per_node", "nodes", "shares_gpu", "nvl_bytes", "rdma_bytes",
    "num_sms", "env", "route_rows", "recv_rows", "check", "aligner"}`` plus, per operation of
    :data:`OPS`, what :func:`~epcomm.tools.bench.timing.measure` records (``{op}_us``, ...) and
    :func:`~epcomm.tools.bench.accounting.internode_op_rates` gives (``{op}_GBps``,
    ``{op}_rdma_GBps``, ``{op}_net_GBps``, ``{op}_nvl_GBps``, ``{op}_route_bytes``), and the
    NCCL baselines (``nccl_*``) or ``nccl_skipped``.  Raises RuntimeError if the Buffer did not
    take the internode route."""
    share = bool(args.get("share_gpu"))
    torch, dist, align = worker_setup(rank, world, group, args.get("aligner", "clock"), share_gpu=share)
    P, N, H, K, E = args["ranks_per_node"], args["tokens"], args["hidden"], args["topk"], args["experts"]
    iters, warmup = args["iters"], (D.SHARED_GPU_WARMUP if share else D.WARMUP)
    # Room for the worst case: every token of every rank received, and staged by the combine.
    nvl = epcomm.Buffer.get_internode_nvl_size_hint(H, world * N)
    rdma = epcomm.Buffer.get_rdma_buffer_size_hint(H, world, N, P)
    buf = epcomm.Buffer(group, nvl, rdma)
    out = {"rank": rank, "ranks_per_node": P, "nodes": world // P, "shares_gpu": share or buf.shares_gpu,
           "nvl_bytes": nvl, "rdma_bytes": rdma, "num_sms": buf.get_dispatch_config().num_sms, "env": env_seen(),
           "check": {}}
    prog = Progress(args, "internode", rank, out)
    inter = buf._inter
    if inter is None or inter.rpn != P:
        raise RuntimeError(f"the Buffer did not take the internode route with {P} ranks per node "
                           f"(EPCOMM_RANKS_PER_NODE={envs.RANKS_PER_NODE.get()})")
    inp = normal_inputs(torch, rank, N, H, K, E)
    ntr, nrr, nte, itr, _ = buf.get_dispatch_layout(inp.topk, E)
    route = dict(num_tokens_per_rank=ntr, num_tokens_per_rdma_rank=nrr, is_token_in_rank=itr,
                 num_tokens_per_expert=nte, topk_idx=inp.topk, topk_weights=inp.w)
    prog("reference")
    chk = NormalCheck(torch, gatherer(torch, dist, group), rank, world, inp.x, inp.xq, inp.xs, inp.topk, inp.w, E,
                      num_ranks_per_node=P)
    try:
        rows = {k: int(v[rank]) for k, v in internode_route_rows(list(chk.topk_all), E, P).items()}
        out["route_rows"] = rows
    except (ValueError, TypeError) as e:  # the same routing fails the checks too: recorded there
        rows = None
        out["route_rows_error"] = f"{type(e).__name__}: {e}"

    st: dict = {}

    def dispatch_bf16():
        st["r"] = buf.dispatch(inp.x, **route)
    prog("dispatch_bf16")
    measure(torch, out, "dispatch_bf16", dispatch_bf16, iters, warmup, align)
    if "r" not in st or "dispatch_bf16_error" in out:
        return finish(out, prog, align, dist, buf)
    recv_x, handle = st["r"][0], st["r"][4]
    y = chk.combine_input(recv_x)
    calls = {"dispatch_fp8": lambda: buf.dispatch((inp.xq, inp.xs), **route), "combine": lambda: buf.combine(y, handle)}
    for name in calls:
        prog(name)
        measure(torch, out, name, calls[name], iters, warmup, align)
    out["recv_rows"] = int(recv_x.shape[0])
    rb = normal_row_bytes(H)
    for name, fmt, comb in OPS:
        if f"{name}_us" not in out:
            continue
        if rows is None:
            out[f"{name}_GBps"] = gbps(out["recv_rows"] * rb[fmt], out[f"{name}_us"])
            continue
        rates = internode_op_rates(dict(rows, recv=out["recv_rows"]), rb[fmt], out[f"{name}_us"], comb)
        out.update({f"{name}_{k}": v for k, v in rates.items()})

    # Checks, untimed: the timed BF16 dispatch's last outputs, then one more call of each other
    # operation (every rank makes the same calls, whatever its comparisons find).
    prog("check")
    torch.cuda.synchronize()
    record_check(out["check"], "dispatch_bf16", chk.dispatch(st["r"], False, True))
    if "dispatch_fp8_error" not in out:
        got = calls["dispatch_fp8"]()
        torch.cuda.synchronize()
        record_check(out["check"], "dispatch_fp8", chk.dispatch(got, True, True))
    if "combine_error" not in out:
        got = calls["combine"]()[0]
        torch.cuda.synchronize()
        record_check(out["check"], "combine", chk.combine(got))

    prog("baselines")
    if share:
        out["nccl_skipped"] = NCCL_SKIPPED
    else:
        out.update(nccl_same_payload(torch, dist, ntr.tolist(), handle.recv_counts, rb, iters, align))
    return finish(out, prog, align, dist, buf)
