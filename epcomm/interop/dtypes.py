"""dtype names, item sizes, DLPack type codes and the per-framework dtype tables.

dtype names are framework neutral (:data:`DTYPES`).  The torch and NumPy tables (NumPy's also
serve CuPy) are built the first time they are needed, so importing this module imports neither
framework.
"""
from __future__ import annotations

DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
          "float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2")

ITEMSIZE = {
    "bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4,
    "int64": 8, "uint64": 8, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "float8_e4m3fn": 1, "float8_e5m2": 1,
}

# dtypes CuPy cannot represent, and the same-size unsigned integer dtype that stands for them
CUPY_STANDIN = {"bfloat16": "uint16", "float8_e4m3fn": "uint8", "float8_e5m2": "uint8"}

# DLPack (type code, bits) -> dtype name (checked against torch 2.13 and jax 0.10 exports)
DL_CODE = {
    (0, 8): "int8", (0, 16): "int16", (0, 32): "int32", (0, 64): "int64",
    (1, 8): "uint8", (1, 16): "uint16", (1, 32): "uint32", (1, 64): "uint64",
    (2, 16): "float16", (2, 32): "float32", (2, 64): "float64",
    (4, 16): "bfloat16", (6, 8): "bool", (10, 8): "float8_e4m3fn", (12, 8): "float8_e5m2",
}
DL_OF_NAME = {name: code for code, name in DL_CODE.items()}


def check_dtype_name(dtype: str) -> str:
    """``dtype`` itself if it is a name from :data:`DTYPES`; TypeError otherwise."""
    if dtype not in ITEMSIZE:
        raise TypeError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    return dtype


# Filled in place the first time they are needed, so that a module holding them (by
# ``from ... import``) reads the built tables with one dict lookup.
TORCH_NAMES: dict = {}  # torch dtype -> name
_TORCH_OF_NAME: dict = {}  # name -> torch dtype
NP_NAMES: dict = {}  # numpy dtype -> name
_NP_OF_NAME: dict = {}  # name -> numpy dtype


def torch_tables():
    """(torch dtype -> name, name -> torch dtype), for the names this torch has."""
    if not _TORCH_OF_NAME:
        import torch
        m = {}
        for n in DTYPES:
            t = getattr(torch, n, None)
            if isinstance(t, torch.dtype):
                m[t] = n
        TORCH_NAMES.update(m)
        _TORCH_OF_NAME.update({n: t for t, n in m.items()})
    return TORCH_NAMES, _TORCH_OF_NAME


def np_tables():
    """numpy dtype -> name, and name -> numpy dtype (bf16 / fp8 through ml_dtypes)."""
    if not _NP_OF_NAME:
        import numpy as np
        m = {}
        for n in DTYPES:
            try:
                d = np.dtype(n)
            except TypeError:
                try:
                    import ml_dtypes
                    d = np.dtype(getattr(ml_dtypes, n))
                except (ImportError, AttributeError, TypeError):
                    continue
            m[d] = n
        NP_NAMES.update(m)
        _NP_OF_NAME.update({n: d for d, n in m.items()})
    return NP_NAMES, _NP_OF_NAME


def _name_of(table: dict, dt) -> str:
    name = table.get(dt)
    if name is None:
        s = str(dt)
        name = "?" + (s[6:] if s.startswith("torch.") else s)
    return name


def torch_name(dt) -> str:
    """The name of torch dtype ``dt``, or '?' + its own spelling when it has none (as_tensor
    reports such a dtype as unsupported).  Hot paths try ``TORCH_NAMES.get(dt)`` first."""
    return _name_of(torch_tables()[0], dt)


def np_name(dt) -> str:
    """The name of numpy dtype ``dt`` (also CuPy's and JAX's), or '?' + its spelling when it
    has none.  Hot paths try ``NP_NAMES.get(dt)`` first."""
    return _name_of(np_tables()[0], dt)


def np_dtype(name: str):
    """The numpy dtype of ``name``; TypeError if it needs ml_dtypes and that is missing."""
    d = np_tables()[1].get(name)
    if d is None:
        raise TypeError(f"numpy dtype {name} needs the ml_dtypes package")
    return d
