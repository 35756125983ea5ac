"""Exception types raised by epcomm.  All derive from :class:`EpcommError`."""
from __future__ import annotations


class EpcommError(RuntimeError):
    """Base class of epcomm's runtime errors (bad *arguments* raise ValueError/TypeError)."""


class CompileError(EpcommError):
    """NVRTC or nvJitLink rejected a kernel.  Carries everything needed to reproduce it."""

    def __init__(self, what: str, log: str, options: list[str] | tuple[str, ...], source: str,
                 name: str = ""):
        self.log = log
        self.options = list(options)
        self.source = source
        self.name = name
        numbered = "\n".join(f"{i + 1:5d}  {line}" for i, line in enumerate(source.splitlines()))
        msg = (f"{what} failed for {name or 'kernel'}\n--- log ---\n{log.strip()}\n"
               f"--- options ---\n{' '.join(self.options)}\n--- source ---\n{numbered}")
        super().__init__(msg)


class ToolchainError(EpcommError):
    """A CUDA component needed to compile or run (NVRTC, headers, NVSHMEM, driver) is missing."""


class EpcommTimeoutError(EpcommError, TimeoutError):
    """A peer did not arrive in time.  ``rank``, ``phase``, ``channel`` and ``peer`` say where."""

    def __init__(self, message: str, *, rank: int = -1, phase: str = "", channel: int = -1,
                 peer: int = -1):
        self.rank, self.phase, self.channel, self.peer = rank, phase, channel, peer
        super().__init__(message)


class RankMismatchError(EpcommError):
    """Ranks made the same collective call with different shapes (hidden size, dtype, top-k
    width, number of experts or chunk size).  ``rank``/``peer`` are the two ranks compared,
    ``field`` the first difference, ``mine``/``theirs`` its two values."""

    def __init__(self, message: str, *, rank: int = -1, peer: int = -1, field: str = "", mine: int = 0,
                 theirs: int = 0):
        self.rank, self.peer, self.field, self.mine, self.theirs = rank, peer, field, mine, theirs
        super().__init__(message)


class BufferStateError(EpcommError):
    """The buffer is unusable (destroyed, or poisoned by an earlier timeout or overflow)."""
