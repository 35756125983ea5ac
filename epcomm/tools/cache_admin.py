"""``epcomm cache [list|clear]``: the JIT cache's entries."""
from __future__ import annotations

from epcomm import envs
from epcomm.jit import cache


def main(a) -> int:
    """``epcomm cache``: list the entries (default) or clear them; 0."""
    root = envs.CACHE_DIR.get()
    if a.action == "clear":
        n, freed = cache.clear()
        print(f"removed {n} files ({freed / 2**20:.1f} MiB) from {root}")
        return 0
    entries = cache.list_entries()
    total = 0
    for p, meta, size in entries:
        total += size
        if meta is None:
            print(f"{p.parent.name:14s} {'(corrupt or unreadable: a miss, rebuilt on use)':60s} {size / 2**10:8.0f} KiB  {p.name}")
        else:
            print(f"{p.parent.name:14s} {str(meta.get('label', '?')):44s} {str(meta.get('arch', '?')):7s} "
                  f"epcomm {str(meta.get('epcomm', '?')):7s} {size / 2**10:8.0f} KiB  {p.name[:16]}")
    print(f"{len(entries)} entries, {total / 2**20:.1f} MiB in {root}")
    return 0
