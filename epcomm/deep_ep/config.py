"""DeepEP's ``Config``: the tuning of one normal-mode operation as DeepEP V1 states it, its buffer
size hints, DeepEP's recommended configs per rank count, and what epcomm runs for it.

The size hints are DeepEP V1's formulas (``Config::get_nvl_buffer_size_hint`` and
``Config::get_rdma_buffer_size_hint`` in DeepEP's ``csrc/config.hpp``, now
``csrc/legacy/config.hpp``), with its constants: at most 8 NVLink peers per node
(``NUM_MAX_NVL_PEERS``), 128 top-k slots and 128 scales per token, 8-byte top-k indices
(``topk_idx_t`` = int64), an 8-byte ``SourceMeta`` (two ints, ``csrc/kernels/internode.cu``) and
16-byte ``int4`` words.  The recommended configs are the tables of DeepEP V1's
``Buffer.get_dispatch_config`` / ``get_combine_config`` (``deep_ep/buffer.py``).

Mapping to epcomm (:func:`native_config`): ``num_sms`` keeps its meaning (the SMs one operation
occupies, sending and receiving blocks together).  The four chunk sizes size DeepEP's ring
buffers, where a sender pushes ``num_max_*_chunked_send_tokens`` tokens at a time into a ring of
``num_max_*_chunked_recv_tokens``; epcomm has no ring (each peer's region holds a whole dispatch,
docs/design.md), so they enter only the size hints, and the pipelining (``chunk_rows``,
``send_fraction``) is epcomm's own default for the Buffer's rank and node count.  DeepEP's
chunk sizes are tuned for its rings (1 to 36 tokens): as epcomm's rows per arrival flag they
would make every flag round trip cover a handful of rows.
"""
from __future__ import annotations

from dataclasses import dataclass

from epcomm.config import Config as NativeConfig
from epcomm.validate import check_int

# DeepEP V1's constants (csrc/kernels/configs.cuh, csrc/config.hpp, csrc/kernels/internode.cu).
NUM_MAX_NVL_PEERS = 8
_MAX_TOPK = 128
_MAX_SCALES = 128
_TOPK_IDX_BYTES = 8      # topk_idx_t: int64 unless DeepEP was built with TOPK_IDX_BITS=32
_SOURCE_META_BYTES = 8   # struct SourceMeta { int src_rdma_rank, is_token_in_nvl_rank_bits; }
_INT_BYTES, _FLOAT_BYTES, _INT4_BYTES = 4, 4, 16


def _align_up(a: int, b: int) -> int:
    return -(-a // b) * b


@dataclass(frozen=True)
class Config:
    """DeepEP's ``deep_ep.Config(num_sms, num_max_nvl_chunked_send_tokens,
    num_max_nvl_chunked_recv_tokens, num_max_rdma_chunked_send_tokens,
    num_max_rdma_chunked_recv_tokens)``, with DeepEP's defaults (20, 6, 256, 6, 256).

    Every argument is an int (NumPy ints accepted; TypeError otherwise).  Raises ValueError where
    DeepEP's constructor asserts: ``num_sms < 0``; a chunk size < 1; the NVLink send chunk not
    below its receive chunk; the RDMA receive chunk, rounded up to a multiple of the send chunk
    (stored rounded, as DeepEP does), below twice the send chunk.  Immutable and hashable.
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self):
        sms = check_int("Config.num_sms", self.num_sms, lo=0)
        nvl_send = check_int("Config.num_max_nvl_chunked_send_tokens", self.num_max_nvl_chunked_send_tokens, lo=1)
        nvl_recv = check_int("Config.num_max_nvl_chunked_recv_tokens", self.num_max_nvl_chunked_recv_tokens, lo=1)
        rdma_send = check_int("Config.num_max_rdma_chunked_send_tokens", self.num_max_rdma_chunked_send_tokens, lo=1)
        rdma_recv = check_int("Config.num_max_rdma_chunked_recv_tokens", self.num_max_rdma_chunked_recv_tokens, lo=1)
        if nvl_send >= nvl_recv:
            raise ValueError(f"Config: num_max_nvl_chunked_send_tokens={nvl_send} must be below "
                             f"num_max_nvl_chunked_recv_tokens={nvl_recv}")
        rdma_recv = _align_up(rdma_recv, rdma_send)
        # DeepEP: the sender must always find room for a chunk in the ring (lazy head update).
        if rdma_send > rdma_recv // 2:
            raise ValueError(f"Config: num_max_rdma_chunked_send_tokens={rdma_send} must be at most half of "
                             f"num_max_rdma_chunked_recv_tokens (rounded up to a multiple of it: {rdma_recv})")
        for name, v in (("num_sms", sms), ("num_max_nvl_chunked_send_tokens", nvl_send),
                        ("num_max_nvl_chunked_recv_tokens", nvl_recv),
                        ("num_max_rdma_chunked_send_tokens", rdma_send),
                        ("num_max_rdma_chunked_recv_tokens", rdma_recv)):
            object.__setattr__(self, name, v)  # frozen dataclass: plain ints, the RDMA ring rounded

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """DeepEP's NVLink buffer bytes for tokens of ``hidden_bytes`` bytes on ``num_ranks``
        ranks (its formula, see the module docstring).

        What it means for epcomm: a buffer of this size holds about
        ``bytes / (min(num_ranks, 8) * row bytes)`` tokens per dispatch (a whole dispatch per
        peer region); a larger dispatch raises ValueError naming the size it needs
        (``epcomm.Buffer.get_nvl_buffer_size_hint`` sizes one for a token count).

        Raises TypeError for non-int arguments, ValueError for ``hidden_bytes`` < 1,
        ``num_ranks`` < 1, and where DeepEP asserts: more than 8 ranks that are not a multiple of
        8, or more than 8 ranks with an odd ``num_sms``."""
        hidden_bytes = check_int("hidden_bytes", hidden_bytes, lo=1)
        num_ranks = check_int("num_ranks", num_ranks, lo=1)
        P = NUM_MAX_NVL_PEERS
        if num_ranks >= P and num_ranks % P:
            raise ValueError(f"num_ranks={num_ranks}: DeepEP's sizing needs fewer than {P} ranks or a multiple of {P}")
        if num_ranks > P and self.num_sms % 2:
            raise ValueError(f"Config.num_sms={self.num_sms}: must be even above {P} ranks (DeepEP's rule)")
        rdma_ranks, nvl_ranks, channels = max(num_ranks // P, 1), min(num_ranks, P), self.num_sms // 2
        slots = channels * nvl_ranks * self.num_max_nvl_chunked_recv_tokens  # token slots of every ring
        n = channels * nvl_ranks * (2 * rdma_ranks + 3) * _INT_BYTES
        n += slots * hidden_bytes
        n += slots * _SOURCE_META_BYTES
        n += slots * _MAX_TOPK * _TOPK_IDX_BYTES
        n += slots * _MAX_TOPK * _FLOAT_BYTES
        n += slots * _MAX_SCALES * _FLOAT_BYTES
        return _align_up(n, 128)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """DeepEP's RDMA buffer bytes for tokens of ``hidden_bytes`` bytes on ``num_ranks`` ranks:
        0 up to 8 ranks (one node in DeepEP's terms), else its formula (module docstring).

        For epcomm this sizes ``num_rdma_bytes`` of a Buffer across nodes only by DeepEP's
        measure; ``epcomm.Buffer.get_rdma_buffer_size_hint`` gives what a token count needs (a
        dispatch that does not fit raises ValueError naming the size).  Raises like
        :meth:`get_nvl_buffer_size_hint` (above 8 ranks: a multiple of 8, an even ``num_sms``)."""
        hidden_bytes = check_int("hidden_bytes", hidden_bytes, lo=1)
        num_ranks = check_int("num_ranks", num_ranks, lo=1)
        P = NUM_MAX_NVL_PEERS
        if num_ranks <= P:
            return 0
        if num_ranks % P:
            raise ValueError(f"num_ranks={num_ranks}: DeepEP's sizing needs a multiple of {P} above {P} ranks")
        if self.num_sms % 2:
            raise ValueError(f"Config.num_sms={self.num_sms}: must be even above {P} ranks (DeepEP's rule)")
        rdma_ranks, channels = num_ranks // P, self.num_sms // 2
        slots = channels * rdma_ranks * self.num_max_rdma_chunked_recv_tokens
        n = channels * rdma_ranks * (P * 2 + 2) * 2 * _INT_BYTES
        n += slots * hidden_bytes * 2
        n += slots * _SOURCE_META_BYTES * 2
        n += slots * _MAX_TOPK * _TOPK_IDX_BYTES * 2
        n += slots * _MAX_TOPK * _FLOAT_BYTES * 2
        n += slots * _MAX_SCALES * _FLOAT_BYTES * 2
        n += slots * _INT4_BYTES * 2
        return _align_up(n, 128)


# DeepEP V1's recommended configs: rank count -> the four chunk sizes (nvl send, nvl recv,
# rdma send, rdma recv); num_sms is Buffer.num_sms at the time of the call.
DISPATCH_TABLE = {
    2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128), 16: (36, 288, 20, 128),
    24: (32, 288, 8, 128), 32: (32, 288, 8, 128), 48: (32, 288, 8, 128), 64: (32, 288, 8, 128),
    96: (20, 480, 12, 128), 128: (20, 560, 12, 128), 144: (32, 720, 12, 128), 160: (28, 720, 12, 128),
}
COMBINE_TABLE = {
    2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128), 16: (4, 288, 12, 128),
    24: (1, 288, 8, 128), 32: (1, 288, 8, 128), 48: (1, 288, 8, 128), 64: (1, 288, 8, 128),
    96: (1, 480, 8, 128), 128: (1, 560, 8, 128), 144: (2, 720, 8, 128), 160: (2, 720, 8, 128),
}


def recommended(table: dict, num_ranks: int, num_sms: int, what: str) -> Config:
    """DeepEP's recommended Config of ``table`` for ``num_ranks`` with ``num_sms``; TypeError for a
    non-int ``num_ranks``, ValueError for a rank count DeepEP has no config for."""
    num_ranks = check_int("num_ranks", num_ranks)
    if num_ranks not in table:
        raise ValueError(f"get_{what}_config: DeepEP has no recommended config for {num_ranks} ranks "
                         f"(it has them for {sorted(table)}); pass a Config, or config=None to let the "
                         f"call use epcomm's default for its rank count")
    return Config(num_sms, *table[num_ranks])


def native_config(config, default: NativeConfig, num_sms: int) -> NativeConfig:
    """The epcomm Config a call runs with: ``default`` (the epcomm Buffer's own, for its rank and
    node count) with the SM budget of ``config`` (a DeepEP :class:`Config`), or ``num_sms`` when
    ``config`` is None (DeepEP then uses ``Buffer.num_sms``); an epcomm Config is used as given.
    Raises TypeError for anything else, and what the epcomm Config raises (``num_sms`` < 2)."""
    if config is None:
        sms = num_sms
    elif isinstance(config, Config):
        sms = config.num_sms
    elif isinstance(config, NativeConfig):
        return config
    else:
        raise TypeError(f"config: expected a deep_ep Config (epcomm.deep_ep.Config), an epcomm.Config or None, "
                        f"got {type(config).__name__}")
    if sms < 2:
        raise ValueError(f"config.num_sms={sms}: epcomm needs at least 2 SMs (one sending, one receiving block)")
    return default if default.num_sms == sms else default.with_sms(sms)
