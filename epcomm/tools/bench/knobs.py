"""The benchmark's environment variables (recorded in its JSON), declared with the library's
:class:`epcomm.envs.Knob`; not library settings, so not in :data:`epcomm.envs.KNOBS`."""
from __future__ import annotations

import textwrap

from epcomm import envs

KNOBS: dict[str, envs.Knob] = {}

GIT_COMMIT = envs.knob("EPCOMM_GIT_COMMIT", "", envs.parse_str,
                       "Commit recorded in the benchmark's JSON (`meta.commit`); default: `git rev-parse` "
                       "of the checkout, where git is available.", "'' (git)", registry=KNOBS)
BENCH_KIND = envs.knob("EPCOMM_BENCH_KIND", "", envs.parse_str,
                       "Machine kind recorded in the benchmark's JSON (`meta.kind`).", "''", registry=KNOBS)


def help_text() -> str:
    """One line per variable, for ``epcomm bench --help``."""
    return "\n".join(textwrap.fill(f"{k.name} (default {k.default_doc}): {k.doc}", 96, initial_indent="  ",
                                   subsequent_indent="    ") for k in KNOBS.values())
