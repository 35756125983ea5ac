"""CPU tests of the internode normal mode's host side: the symmetric-heap layout and its sizing
hints, the dispatch's shape word, the topology rules, the kernel specialization and its
catalogue/CLI entries, the Python mirrors against ``cuda_src/internode.cuh``, and the argument
checks of the internode dispatch and combine, which must all raise before any kernel module is
loaded (the module load and every launch are replaced by a sentinel that raises)."""
from __future__ import annotations

import contextlib
import ctypes
import re
from pathlib import Path

import numpy as np
import pytest

from epcomm.buffer import Buffer
from epcomm.internode import InternodeHandle, InternodeState
from epcomm.jit import toolchain
from epcomm.kernels import catalogue
from epcomm.kernels import internode as K
from epcomm.kernels.layout import LayoutSpec
from epcomm.normal.handle import DispatchHandle

SRC = Path(__file__).resolve().parents[2] / "cuda_src" / "internode.cuh"

# (H, R, P, N): model hidden sizes, two to eight nodes of 2 or 8 ranks, small and large N.
HINT_CASES = [(2880, 4, 2, 1), (2880, 16, 8, 4096), (7168, 4, 2, 128), (7168, 16, 8, 4096),
              (7168, 64, 8, 4096), (4096, 64, 8, 513), (128, 256, 32, 7)]


def _regions(lay: K.InterLayout, R: int, P: int) -> dict[str, tuple[int, int]]:
    """Every region of the layout as (offset, bytes), sized as the kernels index them."""
    M = R // P
    return {
        "hdr_flag": (lay.hdr_flag_off, 8 * R),
        "disp_ack": (lay.disp_ack_off, 8 * M),
        "disp_flag": (lay.disp_flag_off, 8 * M * K.MAX_CHUNKS),
        "stage_flag": (lay.stage_flag_off, 8 * K.MAX_RANKS_PER_NODE),
        "stage_ack": (lay.stage_ack_off, 8),
        "comb_ack": (lay.comb_ack_off, 8 * M),
        "comb_flag": (lay.comb_flag_off, 8 * M * K.MAX_CHUNKS),
        "offsets": (lay.offsets_off, 4 * (R + 1)),
        "hdr": (lay.hdr_off, R * lay.hdr_stride),
        "hdr_stage": (lay.hdr_stage_off, M * lay.hdr_stride),
        "disp_recv": (lay.disp_recv_off, M * lay.ncap * lay.msg_stride),
        "disp_send": (lay.disp_send_off, M * lay.ncap * lay.msg_stride),
        "comb_recv": (lay.comb_recv_off, M * lay.ncap * lay.part_stride),
        "comb_send": (lay.comb_send_off, M * lay.ncap * lay.part_stride),
        "stage": (lay.stage_off, lay.stage_rows * lay.stage_stride),
    }


_CONTROL = ("hdr_flag_off", "hdr_off", "hdr_stage_off", "disp_ack_off", "disp_flag_off", "stage_flag_off",
            "stage_ack_off", "comb_ack_off", "comb_flag_off", "offsets_off", "hdr_stride")


def _row_bytes(H: int, R: int, P: int) -> int:
    """Bytes one more slot per source node costs in the four network regions."""
    return 2 * (R // P) * (K.msg_stride(H, R) + K.part_stride(H))


# ---- heap layout ----------------------------------------------------------------------------

@pytest.mark.parametrize("H,R,P,N", HINT_CASES)
def test_layout_regions_are_disjoint_aligned_and_fit_the_heap(H, R, P, N):
    rdma, nvl = K.rdma_size_hint(H, R, P, N), K.nvl_size_hint(H, R * N)
    lay = K.InterLayout.make(R, P, H, rdma, nvl)
    regs = _regions(lay, R, P)
    spans = sorted((off, off + n, name) for name, (off, n) in regs.items())
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        assert end_a <= start_b, f"{a} overlaps {b}"
    assert spans[-1][1] <= lay.total <= rdma + nvl + 4096  # InternodeState allocates rdma + nvl + 4096
    # The network regions lie in the num_rdma_bytes part; the stage follows it.
    assert max(off + n for name, (off, n) in regs.items() if name != "stage") <= rdma <= lay.stage_off
    # 64-bit flags and 16-byte row copies (V4 loads and stores, NVSHMEM puts of whole rows).
    for name, (off, _) in regs.items():
        assert off % 16 == 0, name
    for s in (lay.msg_stride, lay.part_stride, lay.stage_stride, lay.hdr_stride):
        assert s % 16 == 0
    assert lay.stage_off % 4096 == 0 and lay.disp_recv_off % 4096 == 0


def test_control_words_do_not_move_with_the_hidden_size():
    # Ranks that disagree on a call's hidden size compute different regions, but must still meet
    # at the same flags and headers to detect the disagreement.
    for R, P in ((4, 2), (16, 8), (64, 8), (256, 32), (6, 3)):
        lays = [K.InterLayout.make(R, P, H, rdma, nvl) for H in (128, 2880, 7168)
                for rdma, nvl in ((64 << 20, 1 << 20), (3 << 30, 7 << 20))]
        for name in _CONTROL:
            assert len({getattr(lay, name) for lay in lays}) == 1, (R, P, name)
        # ... and the control words end where InterLayout.control_bytes says.
        assert {lay.disp_recv_off for lay in lays} == {K.InterLayout.control_bytes(R, P)}
    # Different node shapes do move them (so the comparison above is not vacuous).
    a, b = K.InterLayout.make(4, 2, 128, 1 << 24, 0), K.InterLayout.make(16, 8, 128, 1 << 24, 0)
    assert a.disp_ack_off != b.disp_ack_off and a.hdr_stage_off != b.hdr_stage_off


def test_ncap_grows_with_the_rdma_bytes():
    R, P, H = 16, 8, 7168
    row = _row_bytes(H, R, P)
    base = K.InterLayout.control_bytes(R, P)
    caps = [K.InterLayout.make(R, P, H, base + k * row // 3, 1 << 20).ncap for k in range(0, 40)]
    assert caps == sorted(caps) and caps[0] == 0 and caps[-1] == 39 // 3
    assert K.InterLayout.make(R, P, H, base + 5 * row, 0).ncap == 5
    assert K.InterLayout.make(R, P, H, base + 5 * row - 1, 0).ncap == 4


@pytest.mark.parametrize("H,R,P,N", HINT_CASES)
def test_rdma_size_hint_holds_n_tokens_and_one_row_less_does_not(H, R, P, N):
    hint = K.rdma_size_hint(H, R, P, N)
    assert hint % 4096 == 0
    assert K.InterLayout.make(R, P, H, hint, 0).ncap >= N
    # The hint is rounded up to a page; below the exact size (control + N slots) N do not fit.
    exact = K.InterLayout.control_bytes(R, P) + N * _row_bytes(H, R, P)
    assert hint - 4096 < exact <= hint
    assert K.InterLayout.make(R, P, H, exact - 1, 0).ncap == N - 1
    assert K.InterLayout.make(R, P, H, hint - _row_bytes(H, R, P), 0).ncap < N
    # FP8 messages are no larger than BF16 ones: one hint serves both.
    assert K.msg_stride(H, R) >= H + 4 * (H // 128) + 4 + 8 * K.MAX_TOPK + 4 * R


@pytest.mark.parametrize("H", [128, 2880, 7168])
@pytest.mark.parametrize("rows", [1, 17, 4096, 65536])
def test_nvl_size_hint_stages_the_rows_and_one_byte_less_does_not(H, rows):
    nvl = K.nvl_size_hint(H, rows)
    assert K.InterLayout.make(16, 8, H, 1 << 26, nvl).stage_rows >= rows
    assert K.InterLayout.make(16, 8, H, 1 << 26, nvl - 1).stage_rows == rows - 1
    # A staged row holds the bf16 row and MAX_TOPK weights (the kernel writes them after the row).
    assert K.stage_stride(H) >= 2 * H + 4 * K.MAX_TOPK


def test_a_heap_too_small_for_the_control_words_is_refused():
    R, P, H = 64, 8, 7168
    rdma, nvl = 4096, K.nvl_size_hint(H, 16)
    with pytest.raises(ValueError, match="num_rdma_bytes=4096: 64 ranks in nodes of 8 need at least"):
        K.InterLayout.make(R, P, H, rdma, nvl)
    lay = K.InterLayout.make(R, P, H, K.InterLayout.control_bytes(R, P), nvl)
    assert lay.ncap == 0 and lay.total <= K.InterLayout.control_bytes(R, P) + nvl + 4096


# ---- shape word and topology ------------------------------------------------------------------

@pytest.mark.parametrize("fields", [(7168, True, 8, 256, 64), (2880, False, 0, 4, 1), (128, False, 32, 32767, 65535),
                                    ((1 << 18) - 1, True, 63, 1, 7)])
def test_shape_word_round_trips(fields):
    H, fp8, Kt, E, cr = fields
    w = K.shape_word(H, fp8, Kt, E, cr)
    assert 0 <= w < 1 << 64  # one u64 in the header
    assert K.unpack_shape_word(w) == dict(hidden=H, fp8=int(fp8), num_topk=Kt, num_experts=E, chunk_rows=cr)


def test_shape_word_fields_do_not_overlap():
    names = ("hidden", "fp8", "num_topk", "num_experts", "chunk_rows")
    widths = dict(K._SHAPE_FIELDS)
    seen = 0
    for i, name in enumerate(names):
        vals = [0] * 5
        vals[i] = (1 << widths[name]) - 1  # every bit of this field alone
        w = K.shape_word(*vals)
        assert w & seen == 0
        seen |= w
        assert K.unpack_shape_word(w) == {n: (vals[i] if n == name else 0) for n in names}


@pytest.mark.parametrize("bad,name", [((1 << 18, False, 8, 256, 64), "hidden"), ((7168, False, 64, 256, 64), "num_topk"),
                                      ((7168, False, 8, 1 << 17, 64), "num_experts"),
                                      ((7168, False, 8, 256, 1 << 16), "chunk_rows"),
                                      ((7168, False, -1, 256, 64), "num_topk")])
def test_shape_word_refuses_fields_that_do_not_fit(bad, name):
    with pytest.raises(ValueError, match=f"{name}=-?\\d+ does not fit"):
        K.shape_word(*bad)


def test_check_topology():
    assert K.check_topology(16, 8) == (16, 8)
    assert K.check_topology(256, 32) == (256, 32)
    assert K.check_topology(np.int64(4), np.int32(1)) == (4, 1)  # NumPy ints are ints
    with pytest.raises(ValueError, match="ranks_per_node=8 does not divide num_ranks=12"):
        K.check_topology(12, 8)
    with pytest.raises(ValueError, match="one node"):
        K.check_topology(8, 8)
    with pytest.raises(ValueError, match="num_ranks"):
        K.check_topology(264, 8)  # 33 nodes of 8: more ranks than the kernels hold
    with pytest.raises(ValueError, match="ranks_per_node"):
        K.check_topology(128, 64)
    with pytest.raises(ValueError, match="num_ranks"):
        K.check_topology(1, 1)
    for bad in ((16.0, 8), ("16", 8), (16, True), (16, None)):
        with pytest.raises(TypeError):
            K.check_topology(*bad)


# ---- specialization, catalogue and CLI --------------------------------------------------------

def test_spec_validate_and_kernels():
    K.InternodeSpec(2880, False).validate()
    K.InternodeSpec(7168, True).validate()
    with pytest.raises(ValueError, match="multiple of 128"):
        K.InternodeSpec(2880, True).validate()
    for H in (0, -128):
        with pytest.raises(ValueError, match=f"hidden={H}"):
            K.InternodeSpec(H, False).validate()
    with pytest.raises(ValueError):
        K.InternodeSpec(100, False).validate()
    dispatch = {"prep", "notify", "send", "recv"}
    combine = {"stage", "reduce", "crecv"}
    bf = {k.short: k for k in K.InternodeSpec(7168, False).kernels()}
    f8 = {k.short: k for k in K.InternodeSpec(7168, True).kernels()}
    assert set(bf) == dispatch | combine and set(f8) == dispatch
    assert bf["send"].name_expression == "epcomm::internode_dispatch_send<7168, false>"
    assert f8["recv"].name_expression == "epcomm::internode_dispatch_recv<7168, true>"
    assert bf["reduce"].name_expression == "epcomm::internode_combine_reduce<7168>"
    assert all(k.params is K.InterParams for k in bf.values())


@pytest.mark.parametrize("offsets", [True, False])
def test_render_asserts_both_mirrors(monkeypatch, offsets):
    monkeypatch.setattr(toolchain, "nvrtc_has_builtin_offsetof", lambda: offsets)
    src = K.InternodeSpec(4096, False).render()
    for m in (K.InterParams, K.InterCtrl):
        assert f"static_assert(sizeof({m._cname_}) == {ctypes.sizeof(m)}," in src
        for f in m._fields_:
            line = f"static_assert(__builtin_offsetof({m._cname_}, {f[0]}) == {getattr(m, f[0]).offset},"
            assert (line in src) == offsets, f[0]
    assert '#include "internode.cuh"' in src
    assert src.count("template __global__ void epcomm::internode_") == 7


def _cxx_fields(struct: str) -> list[str]:
    """Member names of ``struct`` in internode.cuh, in declaration order."""
    text = SRC.read_text()
    body = re.search(rf"struct {struct} \{{(.*?)\n\}};", text, re.S).group(1)
    body = re.sub(r"//[^\n]*", "", body)
    names = []
    for decl in body.split(";"):
        decl = decl.strip()
        if not decl:
            continue
        decl = re.sub(r"\[[^\]]*\]", "", decl)  # array extents
        head, *rest = decl.split(",")
        names.append(re.split(r"[\s*]+", head.strip())[-1])
        names += [r.strip().lstrip("*").strip() for r in rest]
    return names


@pytest.mark.parametrize("mirror", [K.InterParams, K.InterCtrl])
def test_mirrors_name_the_cuda_fields_in_order(mirror):
    # The static_asserts catch a drift at compile time; this catches it without a compiler.
    assert [f[0] for f in mirror._fields_] == _cxx_fields(mirror._cname_.split("::")[1])


def test_constants_and_phases_shared_with_the_cuda_source():
    src = SRC.read_text()
    for cname, value in (("kInterThreads", K.THREADS), ("kInterMaxRanks", K.MAX_RANKS),
                         ("kInterMaxRanksPerNode", K.MAX_RANKS_PER_NODE), ("kInterMaxTopk", K.MAX_TOPK)):
        assert re.search(rf"constexpr int {cname} = {value};", src), cname
    enum = re.search(r"enum InterPhase : int \{(.*?)\};", src, re.S).group(1)
    assert sorted(int(v) for v in re.findall(r"= (\d+),", enum)) == sorted(K.PHASES)
    # The InterCtrl mirror's src_slots has one entry per rank.
    assert K.InterCtrl.src_slots.size == 4 * K.MAX_RANKS


def test_catalogue_lists_the_internode_specs():
    skipped: list = []
    specs = catalogue.specs_for((2880, 7168), (2, 4, 8), modes=("internode",), skipped=skipped)
    assert specs == [LayoutSpec(), K.InternodeSpec(2880, False), K.InternodeSpec(7168, False),
                     K.InternodeSpec(7168, True)]
    assert [label for label, _ in skipped] == [K.InternodeSpec(2880, True).label()]
    bf16 = catalogue.specs_for((4096,), (2,), dtypes=("bf16",), modes=("internode",))
    assert [s for s in bf16 if isinstance(s, K.InternodeSpec)] == [K.InternodeSpec(4096, False)]
    assert K.InternodeSpec(2880, False) in catalogue.preset("gpt-oss")
    assert K.InternodeSpec(7168, True) in catalogue.shipped()


def test_warmup_cli_accepts_the_internode_mode(monkeypatch, capsys):
    from epcomm.tools import cli, warmup
    built = []

    def build_all(specs, arch, jobs):  # instead of compiling
        built.extend(specs)
        return [(s.label(), "cached", 0.0, "") for s in specs]

    monkeypatch.setattr(warmup, "_build_all", build_all)
    monkeypatch.setattr(warmup, "_check_cache", lambda: None)
    rc = cli.main(["warmup", "--mode", "internode", "--hidden", "7168", "--arch", "sm_90", "-j", "1"])
    assert rc == 0, capsys.readouterr()
    assert built == [LayoutSpec(), K.InternodeSpec(7168, False), K.InternodeSpec(7168, True)]
    built.clear()
    rc = cli.main(["warmup", "--mode", "internode", "--hidden", "100", "--arch", "sm_90"])
    assert rc == 2 and built == []
    assert "no kernel specialization fits" in capsys.readouterr().err


# ---- the call paths' checks, before any launch ----------------------------------------------------

class _Launched(Exception):
    """Raised where the call path loads its kernels: a call that reaches it passed every check."""


@pytest.fixture
def rig(monkeypatch):
    torch = pytest.importorskip("torch")
    from fake_driver import cpu_arrays_as_cuda

    from epcomm.jit import loader
    from epcomm.runtime import driver

    def never(*a, **k):
        raise _Launched()

    cpu_arrays_as_cuda(monkeypatch)
    monkeypatch.setattr(driver, "on_device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(loader, "load", never)
    monkeypatch.setattr(K, "launch", never)
    return torch


R4, P2, H = 4, 2, 128


def _state(R=R4, P=P2, slots=3, stage_rows=16) -> InternodeState:
    """A real InternodeState (its layout and chunk rules) without its collective constructor:
    heap sizes for exactly ``slots`` tokens per rank and ``stage_rows`` staged rows at H."""
    st = object.__new__(InternodeState)
    st.num_ranks, st.rpn, st.num_nodes = R, P, R // P
    st.rank, st.node, st.local = 0, 0, 0
    st.num_rdma_bytes = K.InterLayout.control_bytes(R, P) + slots * _row_bytes(H, R, P)
    st.num_nvl_bytes = stage_rows * K.stage_stride(H)
    st._layouts = {}
    st.template = K.InterParams()
    st.info = np.zeros(2 + R + K.MAX_LOCAL_EXPERTS, np.int32)
    return st


def _buffer(st=None, R=R4) -> Buffer:
    from fake_runtime import fake_context
    b = Buffer._assemble(fake_context(R))
    b._inter = st if st is not None else _state()
    return b


def _idx(torch, N, Kt=2, E=8):
    return (torch.arange(N * Kt).reshape(N, Kt) % E).long()


def _handle(b, cls=InternodeHandle, out_rows=8, N=3, Kt=2):
    kw = dict(buffer_id=b.ctx.serial, framework="torch", device_id=0, num_ranks=R4, rank=0, num_tokens=N, hidden=H,
              num_experts=8, num_topk=Kt, num_worst_tokens=0, out_rows=out_rows, num_recv_tokens=out_rows,
              recv_counts=(out_rows, 0, 0, 0), rank_prefix=None, send_list=None, send_pos=None, send_count=None,
              is_token_in_rank=None, recv_src_idx=None)
    if cls is InternodeHandle:
        kw.update(ranks_per_node=P2, chunk_rows=64)
    return cls(**kw)


def test_rig_states_hold_what_they_claim():
    lay = _state().layout(H)
    assert (lay.ncap, lay.stage_rows) == (3, 16)


def test_dispatch_of_more_tokens_than_the_heap_holds_names_the_size_needed(rig):
    torch = rig
    b = _buffer()
    need = K.rdma_size_hint(H, R4, P2, 4)
    with pytest.raises(ValueError, match=rf"4 tokens of hidden {H} need num_rdma_bytes >= {need} .*holds 3 tokens"):
        b.dispatch(torch.zeros(4, H, dtype=torch.bfloat16), topk_idx=_idx(torch, 4), num_experts=8)
    assert K.InterLayout.make(R4, P2, H, need, 0).ncap >= 4  # the size named is enough
    with pytest.raises(_Launched):
        b.dispatch(torch.zeros(3, H, dtype=torch.bfloat16), topk_idx=_idx(torch, 3), num_experts=8)


def test_dispatch_refuses_more_than_32_topk_columns(rig):
    torch = rig
    b = _buffer()
    with pytest.raises(ValueError, match="topk_idx: 33 columns; the internode kernels carry at most 32"):
        b.dispatch(torch.zeros(3, H, dtype=torch.bfloat16), topk_idx=_idx(torch, 3, 33), num_experts=8)
    with pytest.raises(_Launched):
        b.dispatch(torch.zeros(3, H, dtype=torch.bfloat16), topk_idx=_idx(torch, 3, 32), num_experts=8)


def test_dispatch_refuses_more_local_experts_than_the_headers_carry(rig):
    torch = rig
    b = _buffer()
    E = R4 * (K.MAX_LOCAL_EXPERTS + 1)
    with pytest.raises(ValueError, match=f"{K.MAX_LOCAL_EXPERTS + 1} experts per rank"):
        b.dispatch(torch.zeros(3, H, dtype=torch.bfloat16), topk_idx=_idx(torch, 3, E=E), num_experts=E)
    E = R4 * K.MAX_LOCAL_EXPERTS
    with pytest.raises(_Launched):
        b.dispatch(torch.zeros(3, H, dtype=torch.bfloat16), topk_idx=_idx(torch, 3, E=E), num_experts=E)


def test_num_worst_tokens_beyond_the_stage_names_num_nvl_bytes(rig):
    torch = rig
    b = _buffer()
    need = K.nvl_size_hint(H, 17)
    x = torch.zeros(3, H, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=rf"num_worst_tokens=17: .*num_nvl_bytes >= {need} .*stages 16 rows"):
        b.dispatch(x, topk_idx=_idx(torch, 3), num_experts=8, num_worst_tokens=17)
    with pytest.raises(_Launched):
        b.dispatch(x, topk_idx=_idx(torch, 3), num_experts=8, num_worst_tokens=16)


def test_the_shape_word_holds_every_expert_count_the_limits_allow(rig):
    torch = rig
    R, P = 128, 8
    b = _buffer(_state(R, P), R)
    E = R * K.MAX_LOCAL_EXPERTS  # 32768: within the local-expert limit
    x = torch.zeros(3, H, dtype=torch.bfloat16)
    with pytest.raises(_Launched):  # no ValueError on the way: the word has room for it
        b.dispatch(x, is_token_in_rank=torch.ones(3, R, dtype=torch.bool),
                   num_tokens_per_expert=torch.zeros(E, dtype=torch.int32), topk_idx=_idx(torch, 3, E=E))
    assert K.unpack_shape_word(K.shape_word(128, False, 8, K.MAX_RANKS * K.MAX_LOCAL_EXPERTS, 1))["num_experts"] \
        == K.MAX_RANKS * K.MAX_LOCAL_EXPERTS


def test_combine_of_more_rows_than_the_stage_names_num_nvl_bytes(rig):
    torch = rig
    b = _buffer()
    h = _handle(b, out_rows=17)
    need = K.nvl_size_hint(H, 17)
    with pytest.raises(ValueError, match=rf"17 rows to stage need num_nvl_bytes >= {need} .*stages 16 rows"):
        b.combine(torch.zeros(17, H, dtype=torch.bfloat16), h)
    with pytest.raises(_Launched):
        b.combine(torch.zeros(16, H, dtype=torch.bfloat16), _handle(b, out_rows=16))


def test_intranode_handles_are_refused_by_combine_and_cached_dispatch(rig):
    torch = rig
    b = _buffer()
    intra = _handle(b, cls=DispatchHandle)
    with pytest.raises(ValueError, match="handle: comes from a dispatch inside one node"):
        b.combine(torch.zeros(8, H, dtype=torch.bfloat16), intra)
    with pytest.raises(ValueError, match="handle: comes from a dispatch inside one node"):
        b.dispatch(torch.zeros(3, H, dtype=torch.bfloat16), handle=intra)
    # The same handle as an internode one goes through both.
    inter = _handle(b)
    with pytest.raises(_Launched):
        b.combine(torch.zeros(8, H, dtype=torch.bfloat16), inter)
    with pytest.raises(_Launched):
        b.dispatch(torch.zeros(3, H, dtype=torch.bfloat16), handle=inter)


def test_chunk_rows_keep_a_full_region_within_the_chunk_flags():
    st = _state()
    for ncap in (1, 1000, K.MAX_CHUNKS, K.MAX_CHUNKS + 1, 10**6):
        lay = K.InterLayout.make(R4, P2, H, K.InterLayout.control_bytes(R4, P2) + ncap * _row_bytes(H, R4, P2), 0)
        assert lay.ncap == ncap
        for wanted in (1, 64, 4096):
            cr = st.chunk_rows(lay, wanted)
            assert cr >= wanted and -(-ncap // cr) <= K.MAX_CHUNKS
            assert cr == max(wanted, -(-ncap // K.MAX_CHUNKS))


# ---- Buffer's static size hints ------------------------------------------------------------------

def test_buffer_size_hints_delegate_and_validate():
    # Distinct values for every argument: a swapped pair would change the result.
    assert Buffer.get_rdma_buffer_size_hint(7168, 32, 1000, 4) == K.rdma_size_hint(7168, 32, 4, 1000)
    assert Buffer.get_rdma_buffer_size_hint(7168, 32, 1000) == K.rdma_size_hint(7168, 32, 8, 1000)
    assert Buffer.get_rdma_buffer_size_hint(7168, 32, 1000, 4) != Buffer.get_rdma_buffer_size_hint(7168, 32, 1000, 8)
    assert Buffer.get_internode_nvl_size_hint(2880, 777) == K.stage_stride(2880) * 777
    for args, exc, words in (((100, 16, 64), ValueError, "hidden=100"), ((7168, 8, 64), ValueError, "one node"),
                             ((7168, 512, 64), ValueError, "num_ranks"), ((7168, 16, 0), ValueError,
                                                                          "num_max_tokens_per_rank"),
                             ((7168.0, 16, 64), TypeError, "hidden"), ((7168, 16, 64, 5), ValueError, "divide")):
        with pytest.raises(exc, match=words):
            Buffer.get_rdma_buffer_size_hint(*args)
    for args, exc, words in (((100, 8), ValueError, "hidden=100"), ((7168, 0), ValueError, "num_max_recv_tokens"),
                             ((7168, "8"), TypeError, "num_max_recv_tokens")):
        with pytest.raises(exc, match=words):
            Buffer.get_internode_nvl_size_hint(*args)


def test_num_tokens_per_rdma_rank_needs_one_entry_per_node(rig):
    torch = rig
    b = _buffer()  # 4 ranks in 2 nodes
    x = torch.zeros(3, H, dtype=torch.bfloat16)
    for n in (1, 4):  # both divide the rank count (the NVLink engine's rule), neither is the node count
        with pytest.raises(ValueError, match=rf"num_tokens_per_rdma_rank: has {n} entries, expected one per node"):
            b.dispatch(x, topk_idx=_idx(torch, 3), num_experts=8,
                       num_tokens_per_rdma_rank=torch.zeros(n, dtype=torch.int32))
    with pytest.raises(_Launched):
        b.dispatch(x, topk_idx=_idx(torch, 3), num_experts=8, num_tokens_per_rdma_rank=torch.zeros(2, dtype=torch.int32))


@pytest.mark.parametrize("numerics", ["epcomm", "deepep"])
def test_combines_load_the_module_of_the_buffer_s_numerics(rig, monkeypatch, numerics):
    """Across nodes the deepep combine module (bf16 node parts, biases first); inside a node the
    intranode combine with kBiasFirst; an epcomm Buffer the default modules."""
    torch = rig
    from fake_runtime import FakeNvlinkState

    from epcomm.jit import loader
    from epcomm.kernels import intranode as K_intra
    asked = []

    def load(spec, dev):
        asked.append(spec)
        raise _Launched()

    monkeypatch.setattr(loader, "load", load)
    b = _buffer()
    b.ctx.numerics = numerics
    with pytest.raises(_Launched):
        b.combine(torch.zeros(8, H, dtype=torch.bfloat16), _handle(b))
    b2 = Buffer._assemble(b.ctx, nvlink=FakeNvlinkState(R4))
    with pytest.raises(_Launched):
        b2.combine(torch.zeros(8, H, dtype=torch.bfloat16), _handle(b2, cls=DispatchHandle))
    deepep = numerics == "deepep"
    assert asked == [K.InternodeSpec(H, False, deepep=deepep), K_intra.IntranodeCombineSpec(R4, H, deepep=deepep)]
    if deepep:  # combine kernels only, with the flag; the dispatch stays in the default module
        assert [k.short for k in asked[0].kernels()] == ["stage", "reduce", "crecv"]
        assert asked[0].kernels()[1].name_expression == f"epcomm::internode_combine_reduce<{H}, true>"
        assert asked[1].kernels()[0].name_expression == f"epcomm::intranode_combine<{R4}, {H}, true>"
    else:
        assert asked[1].kernels()[0].name_expression == f"epcomm::intranode_combine<{R4}, {H}>"


def test_warmup_cli_builds_the_variants_asked_for(monkeypatch, capsys):
    from epcomm.kernels.intranode import IntranodeCombineSpec
    from epcomm.kernels.low_latency import LowLatencySpec
    from epcomm.tools import cli, warmup
    built = []

    def build_all(specs, arch, jobs):
        built.extend(specs)
        return [(s.label(), "cached", 0.0, "") for s in specs]

    monkeypatch.setattr(warmup, "_build_all", build_all)
    monkeypatch.setattr(warmup, "_check_cache", lambda: None)
    rc = cli.main(["warmup", "--mode", "low-latency,normal", "--dtype", "bf16", "--hidden", "4096", "--ranks", "2",
                   "--variant", "deepep,logfmt", "--arch", "sm_90", "-j", "1"])
    assert rc == 0, capsys.readouterr()
    for s in (LowLatencySpec(4096, False, logfmt=True), LowLatencySpec(4096, False, deepep=True),
              LowLatencySpec(4096, False, deepep=True, logfmt=True), IntranodeCombineSpec(2, 4096, deepep=True)):
        assert s in built
    built.clear()
    rc = cli.main(["warmup", "--preset", "deepseek-v3", "--variant", "logfmt", "--arch", "sm_90", "-j", "1"])
    assert rc == 0, capsys.readouterr()
    assert LowLatencySpec(7168, False, logfmt=True) in built
    assert not any(getattr(s, "deepep", False) for s in built)
    built.clear()
    rc = cli.main(["warmup", "--preset", "deepseek-v3", "--arch", "sm_90", "-j", "1"])
    assert rc == 0 and not any(getattr(s, "logfmt", False) or getattr(s, "deepep", False) for s in built)
    built.clear()
    rc = cli.main(["warmup", "--mode", "low-latency", "--variant", "fast", "--arch", "sm_90"])
    assert rc == 2 and built == [] and "variant 'fast'" in capsys.readouterr().err
