"""Kernel specifications: template arguments apart from runtime parameters.

A :class:`KernelSpec` is a frozen dataclass whose fields are the *template arguments* of one
compiled module (one NVRTC invocation, one cache entry, possibly several kernels that share
them).  The *runtime parameters* of every kernel are one C++ struct passed by value
(``__grid_constant__``), mirrored in Python by a :class:`ParamsStruct` (a ``ctypes.Structure``).

:meth:`KernelSpec.render` produces the small instantiation source that NVRTC compiles:
it includes the family header from ``cuda_src/``, asserts at compile time that every
``ParamsStruct`` mirror has the size and field offsets of its C++ struct (so a mismatch
fails in CPU CI, not as garbage on a GPU), and explicitly instantiates each kernel.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, fields
from typing import ClassVar

from epcomm.jit import toolchain


class ParamsStruct(ctypes.Structure):
    """ctypes mirror of a C++ kernel-parameter struct named by ``_cname_``."""

    _cname_: ClassVar[str] = ""

    @classmethod
    def layout_asserts(cls, offsets: bool = True) -> str:
        c = cls._cname_
        out = [f'static_assert(sizeof({c}) == {ctypes.sizeof(cls)}, '
               f'"{c}: size differs from its Python mirror {cls.__name__}");']
        for f in (cls._fields_ if offsets else ()):
            name = f[0]
            off = getattr(cls, name).offset
            out.append(f'static_assert(__builtin_offsetof({c}, {name}) == {off}, '
                       f'"{c}::{name}: offset differs from its Python mirror");')
        return "\n".join(out)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        vals = ", ".join(f"{f[0]}={getattr(self, f[0])!r}" for f in self._fields_)
        return f"{type(self).__name__}({vals})"


@dataclass(frozen=True)
class KernelDef:
    """One kernel of a module: its C++ template name, template arguments and params type."""

    short: str
    template: str
    targs: tuple
    params: type

    @property
    def name_expression(self) -> str:
        if not self.targs:
            return self.template
        return f"{self.template}<{', '.join(_cxx(a) for a in self.targs)}>"


def _cxx(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


@dataclass(frozen=True)
class KernelSpec:
    """Base class.  Subclasses are frozen dataclasses of template arguments and define:

    * ``family``: short family name (also the cache sub-directory);
    * ``header``: the ``cuda_src/`` header holding the kernels' templates;
    * ``uses_nvshmem``: whether the module calls NVSHMEM device functions (then it is compiled
      relocatable and linked with ``libnvshmem_device.a``);
    * :meth:`kernels`: the kernels of the module;
    * ``mirrors`` (optional): other :class:`ParamsStruct` mirrors the module's kernels share
      with the host (control words the host allocates), layout-checked like the parameters;
    * ``min_sm`` (optional): the oldest architecture it compiles for (default toolchain.MIN_SM).
    """

    family: ClassVar[str] = ""
    header: ClassVar[str] = ""
    uses_nvshmem: ClassVar[bool] = False
    mirrors: ClassVar[tuple] = ()

    @property
    def min_sm(self) -> int:
        """The oldest architecture (e.g. 80 for sm_80) this specialization compiles for."""
        return toolchain.MIN_SM

    def kernels(self) -> tuple[KernelDef, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def validate(self) -> None:
        """Raise ValueError if the template arguments are not supported."""

    def label(self) -> str:
        """``family[name=value,...]``.  Option flags (fields whose default is False) appear only
        when set, so a flag added later leaves the labels of the specializations without it."""
        args = ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                        if not (f.default is False and getattr(self, f.name) is False))
        return f"{self.family}[{args}]"

    def macros(self) -> tuple[tuple[str, str], ...]:
        return (("EPCOMM_WITH_NVSHMEM", "1" if self.uses_nvshmem else "0"),)

    def render(self) -> str:
        self.validate()
        ks = self.kernels()
        lines = [f"// epcomm instantiation source for {self.label()}",
                 f'#include "{self.header}"', ""]
        seen = list(self.mirrors)
        for k in ks:
            if k.params not in seen:
                seen.append(k.params)
        offsets = toolchain.nvrtc_has_builtin_offsetof()
        for p in seen:
            lines.append(p.layout_asserts(offsets))
        lines.append("")
        for k in ks:
            lines.append(f"template __global__ void {k.name_expression}(const __grid_constant__ {k.params._cname_});")
        return "\n".join(lines) + "\n"
