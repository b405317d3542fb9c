"""Devices: the mesh, how batches and state are laid out on it, and multi-process start-up.

The mesh has two axes, ``("data", "fsdp")``. A batch is split along its leading axis over both
(every device sees its own examples); parameters and optimizer state are replicated over
"data" and, when ``fsdp > 1``, each array is sharded over "fsdp" on its largest axis that the
fsdp size divides (arrays with no such axis stay replicated). Plain data parallelism is
``fsdp = 1``.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from train.config import MeshConfig

BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed(cfg: MeshConfig) -> bool:
    """Call ``jax.distributed.initialize()`` when launched as several processes.

    "auto" initializes when Slurm started more than one task (SLURM_NTASKS > 1) or when the
    JAX coordinator variables are set; JAX then reads the process id, count and coordinator
    from Slurm itself. Must run before anything touches the devices.
    """
    if cfg.distributed == "off":
        return False
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    explicit = "JAX_COORDINATOR_ADDRESS" in os.environ
    if cfg.distributed == "on" or slurm_tasks > 1 or explicit:
        jax.distributed.initialize()
        return True
    return False


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh over ``devices`` (default: all). ``data = -1`` takes the rest;
    fewer devices than available may be asked for (e.g. ``data = 1`` for a 1-device run)."""
    devices = list(jax.devices() if devices is None else devices)
    fsdp = cfg.fsdp
    if fsdp < 1:
        raise ValueError(f"mesh.fsdp must be ≥ 1, got {fsdp}")
    if cfg.data == -1:
        if len(devices) % fsdp:
            raise ValueError(f"mesh.fsdp={fsdp} does not divide the {len(devices)} devices")
        data = len(devices) // fsdp
    else:
        data = cfg.data
    if data < 1 or data * fsdp > len(devices):
        raise ValueError(
            f"mesh data={data} × fsdp={fsdp} needs {data * fsdp} devices, {len(devices)} exist"
        )
    grid = np.array(devices[: data * fsdp]).reshape(data, fsdp)
    return Mesh(grid, BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over every mesh axis; the rest of each array whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """FSDP rule: shard the largest axis that ``fsdp`` divides; replicate if none does."""
    if fsdp <= 1 or not shape:
        return P()
    order = sorted(range(len(shape)), key=lambda i: (-shape[i], i))
    for i in order:
        if shape[i] % fsdp == 0 and shape[i] >= fsdp:
            spec = [None] * len(shape)
            spec[i] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(mesh: Mesh, tree):
    """NamedShardings for a pytree of arrays (or ShapeDtypeStructs): parameters, optimizer
    moments, counters — each by :func:`param_spec`."""
    fsdp = mesh.shape["fsdp"]

    def one(x):
        return NamedSharding(mesh, param_spec(tuple(np.shape(x)), fsdp))

    return jax.tree.map(one, tree)


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
    """Examples this process feeds per step; checks that the batch splits evenly."""
    n_dev = mesh.devices.size
    if global_batch % n_dev:
        raise ValueError(
            f"training.batch_size={global_batch} is not divisible by the {n_dev} devices "
            f"of the mesh {dict(mesh.shape)}"
        )
    return global_batch // jax.process_count()


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's slice of the batch → one global array per key, laid out by ``sharding``."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in batch.items()
    }
