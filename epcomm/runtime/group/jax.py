"""JaxGroup: the processes of JAX's distributed runtime, through its key-value store."""
from __future__ import annotations

import base64
import itertools
from typing import Any

from epcomm.runtime.group.protocol import KeyValueGroup, timeout_error, timeout_seconds

_JAX_GROUPS = itertools.count()  # JaxGroups of this process that took their key space


class JaxGroup(KeyValueGroup):
    """All processes of JAX's distributed runtime, talking through its key-value store.

    Needs ``jax.distributed.initialize(...)`` first (or an explicit ``client``, a
    ``DistributedRuntimeClient``).  ``rank = jax.process_index()``, ``size =
    jax.process_count()``.  Keys are ``f"{prefix}/{seq}/{rank}"`` with ``seq`` counting
    this group's collectives, so two groups alive at once in one job must use different
    ``prefix`` values.  Waits are bounded by ``timeout_s`` (default ``EPCOMM_GROUP_TIMEOUT_S``);
    on expiry EpcommTimeoutError is raised naming the ranks that did not arrive.

    Raises RuntimeError if the distributed runtime is not initialized.
    """

    def __init__(self, client: Any = None, prefix: str | None = None, timeout_s: float | None = None):
        import jax
        if client is None:
            from jax._src import distributed
            client = distributed.global_state.client
            if client is None:
                raise RuntimeError("JaxGroup: JAX's distributed runtime is not initialized "
                                   "(call jax.distributed.initialize first)")
        # Without a prefix, each group of a process gets its own key space ("epcomm/<n>": the
        # n-th JaxGroup used here; ranks use them in the same order, as they create Buffers
        # collectively), so a normal-mode and a low-latency Buffer of one job do not collide.
        super().__init__(int(jax.process_index()), int(jax.process_count()), timeout_s, prefix)
        self.client = client
        # older jaxlibs only store str values; base64 keeps bytes intact through them
        self._raw = (hasattr(client, "key_value_set_bytes")
                     and hasattr(client, "blocking_key_value_get_bytes"))

    # ---- the key-value store's primitives ----
    def _new_prefix(self) -> str:
        return f"epcomm/{next(_JAX_GROUPS)}"

    def _set(self, key: str, value: bytes) -> None:
        if self._raw:
            self.client.key_value_set_bytes(key, value)
        else:
            self.client.key_value_set(key, base64.b64encode(value).decode("ascii"))

    def _get(self, key: str, timeout_s: float) -> bytes:
        # the runtime's error type differs across jaxlib versions; a dead coordinator also
        # raises here, and the timeout error's chained cause says so
        ms = max(1, int(timeout_s * 1000))
        if self._raw:
            return bytes(self.client.blocking_key_value_get_bytes(key, ms))
        return base64.b64decode(self.client.blocking_key_value_get(key, ms))

    def _present(self, key: str) -> bool:
        # try_get raises when the key is absent
        if hasattr(self.client, "key_value_try_get_bytes"):
            self.client.key_value_try_get_bytes(key)
        else:
            self.client.key_value_try_get(key)
        return True

    def _delete(self, key: str) -> None:
        self.client.key_value_delete(key)

    def barrier(self) -> None:
        """Return once every process has entered the barrier (the runtime's own barrier).

        Raises EpcommTimeoutError if that does not happen within the timeout.
        """
        seq = self._next()
        timeout = timeout_seconds(self.timeout_s)
        try:
            self.client.wait_at_barrier(f"{self.prefix}/barrier/{seq}", int(timeout * 1000))
        except Exception as e:
            # the coordinator does not tell us who is missing; name nobody rather than guess
            raise timeout_error(self.rank, f"group barrier round {seq}", [], timeout,
                                self._timeout_detail(seq, e)) from e
        self._collect_garbage(seq)

    def __repr__(self) -> str:
        return f"JaxGroup(rank={self.rank}, size={self.size}, prefix={self.prefix!r})"
