"""How every ``epcomm`` command speaks, and its exit codes.

Messages are prefixed with the command, as argparse and pip do: ``epcomm warmup: error: ...``
and ``epcomm warmup: warning: ...`` on stderr (one line each), ``epcomm warmup: ...`` for a
status line on stdout.  Tables and results are printed plainly.
"""
from __future__ import annotations

import sys

# Exit codes of every subcommand (``epcomm --help`` lists them).
OK = 0       # it did what was asked
FAILED = 1   # a step failed: a kernel did not build, a check or a rank failed, a missing or mismatched install
USAGE = 2    # the arguments (or the machine) cannot run it: nothing was started

EXIT_CODES = (f"exit codes: {OK} success; {FAILED} a step failed (a kernel did not build, a check or a rank "
              f"failed, an install is missing or mismatched); {USAGE} bad arguments or nothing to run them on "
              "(nothing was started)")


def _prefix(cmd: str | None) -> str:
    return f"epcomm {cmd}" if cmd else "epcomm"


def error(cmd: str | None, msg: str) -> None:
    """``epcomm <cmd>: error: <msg>`` on stderr."""
    print(f"{_prefix(cmd)}: error: {msg}", file=sys.stderr, flush=True)


def warning(cmd: str | None, msg: str) -> None:
    """``epcomm <cmd>: warning: <msg>`` on stderr."""
    print(f"{_prefix(cmd)}: warning: {msg}", file=sys.stderr, flush=True)


def status(cmd: str | None, msg: str) -> None:
    """``epcomm <cmd>: <msg>`` on stdout (what the command is doing or did)."""
    print(f"{_prefix(cmd)}: {msg}", flush=True)
