"""FileGroup: single-host bootstrap through a shared directory, for jobs with no framework."""
from __future__ import annotations

import os
import tempfile
import time

from epcomm.runtime.group.protocol import KeyValueGroup, WaitExpired
from epcomm.validate import check_int


class FileGroup(KeyValueGroup):
    """Single-host bootstrap through a shared directory, for jobs with no framework.

    Round ``seq`` (one per collective call) lives in ``path/<seq>/``; each writer
    publishes ``<rank>.bin`` atomically (temporary file + ``os.replace``), and readers poll
    for the files they need, sleeping 1 ms at first and up to 50 ms.  ``path`` must be
    unique to this job: files left by an earlier job would be read as this job's data
    (the constructor refuses a directory that already holds a file of this rank).

    Every wait is bounded by ``timeout_s`` (default ``EPCOMM_GROUP_TIMEOUT_S``); on expiry
    :class:`~epcomm.errors.EpcommTimeoutError` names this rank, the phase (e.g.
    ``"group allgather round 3"``) and the ranks that did not arrive.

    Raises TypeError if ``rank`` or ``size`` is not an int, ValueError if they are out of
    range or the directory holds files of this rank already (another or an earlier job).
    """

    _MIN_SLEEP = 0.001
    _MAX_SLEEP = 0.05

    def __init__(self, path: str | os.PathLike, rank: int, size: int,
                 timeout_s: float | None = None):
        size = check_int("FileGroup size", size)
        rank = check_int("FileGroup rank", rank)
        if size < 1:
            raise ValueError(f"FileGroup: size must be >= 1, got {size}")
        if not 0 <= rank < size:
            raise ValueError(f"FileGroup: rank {rank} is out of range for size {size}")
        self.path = os.fspath(path)
        super().__init__(rank, size, timeout_s, prefix=self.path)
        os.makedirs(self.path, exist_ok=True)
        stale = self._find_own_files()
        if stale:
            raise ValueError(f"FileGroup: {self.path} already holds files of rank {self.rank} "
                             f"(e.g. {stale[0]}), left by an earlier job; use a fresh directory")
        # Claim the rank: a second job (or a rerun, or a crashed earlier job's leftovers) in the
        # same directory would otherwise mix its rounds with ours.  Every rank claims before
        # its first collective, so some rank of a second job always refuses here.
        try:
            os.close(os.open(self._claim(self.rank), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            raise ValueError(f"FileGroup: rank {self.rank} of {self.path} is already taken by another job "
                             f"(or an earlier one); use a fresh directory per job") from None

    def _claim(self, rank: int) -> str:
        return os.path.join(self.path, f".rank{rank}.claim")

    def _find_own_files(self) -> list[str]:
        found = []
        with os.scandir(self.path) as it:
            for entry in it:
                f = os.path.join(entry.path, f"{self.rank}.bin")
                if entry.is_dir() and os.path.exists(f):
                    found.append(f)
        return found

    def _round_dir(self, seq: int) -> str:
        return os.path.join(self.path, str(seq))

    # ---- the directory's primitives: a key is a file path ----
    def _key(self, seq: int, rank: int) -> str:
        return os.path.join(self._round_dir(seq), f"{rank}.bin")

    def _set(self, key: str, value: bytes) -> None:
        d = os.path.dirname(key)
        os.makedirs(d, exist_ok=True)
        # a dot-name never matches "<rank>.bin", so readers cannot see a half-written file
        fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{self.rank}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(value)
            os.replace(tmp, key)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def _get(self, key: str, timeout_s: float) -> bytes:
        deadline = time.monotonic() + timeout_s
        sleep = self._MIN_SLEEP
        while True:
            try:
                with open(key, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                pass
            now = time.monotonic()
            if now >= deadline:
                raise WaitExpired(key)
            time.sleep(min(sleep, deadline - now))
            sleep = min(sleep * 1.5, self._MAX_SLEEP)

    def _present(self, key: str) -> bool:
        return os.path.exists(key)

    def _delete(self, key: str) -> None:
        try:
            os.unlink(key)
        except FileNotFoundError:
            pass
        try:
            # succeeds only for whichever rank removes the last file of the round
            os.rmdir(os.path.dirname(key))
        except OSError:
            pass

    def _timeout_detail(self, seq: int, exc: Exception) -> str:
        return f"directory {self._round_dir(seq)}"

    def barrier(self) -> None:
        """Return once every rank has entered the barrier (an allgather of empty strings).

        Raises EpcommTimeoutError naming the missing ranks; the phase reads "group allgather
        round N" because the barrier is that allgather.
        """
        self.allgather_bytes(b"")

    def __repr__(self) -> str:
        return f"FileGroup({self.path!r}, rank={self.rank}, size={self.size})"
