"""Process groups: how the N processes of one epcomm job exchange set-up bytes.

A communication buffer is created collectively by one process per GPU.  At set-up those
processes must exchange a few small byte strings (CUDA IPC handles, NVSHMEM unique ids,
sizes); afterwards all data moves through the GPUs, never through this layer.  So a
:class:`Group` offers only three collectives on ``bytes`` -- it is a bootstrap channel,
not a transport, and nothing here is tuned for volume.

Users arrive from PyTorch, JAX or plain MPI, so no framework is required: every adapter
imports its framework inside its own constructor or methods, and :func:`as_group` only
looks at frameworks that are already imported.

Contract shared by every group: all ranks call the same collectives in the same order
(as with any collective API); a rank that calls a different sequence gets undefined
results or a timeout.

Modules: :mod:`.protocol` (the Group protocol, LocalGroup, and the key-value round protocol
the store adapters share), one adapter per backend (:mod:`.torch`, :mod:`.jax`, :mod:`.files`,
:mod:`.mpi`), and :mod:`.resolve` (as_group, init_from_env).
"""
from __future__ import annotations

from epcomm.runtime.group.files import FileGroup
from epcomm.runtime.group.jax import JaxGroup
from epcomm.runtime.group.mpi import MPIGroup
from epcomm.runtime.group.protocol import Group, LocalGroup
from epcomm.runtime.group.resolve import as_group, init_from_env
from epcomm.runtime.group.torch import TorchGroup

__all__ = [
    "Group", "as_group", "init_from_env",
    "TorchGroup", "MPIGroup", "JaxGroup", "FileGroup", "LocalGroup",
]
