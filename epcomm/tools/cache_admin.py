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
    rows = []
    for p, meta, size in entries:
        if meta is None:
            rows.append((p.parent.name, "(corrupt or unreadable: a miss, rebuilt on use)", "", "", size, p.name))
        else:
            rows.append((p.parent.name, str(meta.get("label", "?")), str(meta.get("arch", "?")),
                         str(meta.get("epcomm", "?")), size, p.name[:16]))
    if rows:
        head = ("family", "specialization", "arch", "epcomm", "size", "key")
        w = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(4)]
        print("  ".join(h.ljust(w[i]) for i, h in enumerate(head[:4])) + "      size  key")
        for r in sorted(rows):
            print("  ".join(r[i].ljust(w[i]) for i in range(4)) + f"  {r[4] / 2**10:6.0f} KiB  {r[5]}")
    print(f"{len(entries)} entries, {sum(e[2] for e in entries) / 2**20:.1f} MiB in {root}")
    return 0
