"""Data parallelism: one mesh axis, 'data', over every device of every process.

The same code runs on 1 CPU, N CPU devices, 1 GPU or 8 GPUs: parameters, optimizer
state and the (small) training set are replicated, each batch is sharded along
'data', and XLA inserts the gradient all-reduce. Results equal the one-device run
within float tolerance (the sum over the batch is split differently).

Multi-host: `initialize_distributed()` calls `jax.distributed.initialize()` when the
environment asks for it (JAX_COORDINATOR_ADDRESS, or a SLURM/Open MPI job of more
than one task, or FVAE_DISTRIBUTED=1 on a TPU pod or GKE). Every process holds the
whole training set and draws the same permutation; each process's devices compute
only their own shard of every batch, so the data is sharded by process.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """A 1-D device mesh and the two shardings training needs."""
    mesh: Mesh

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec("data"))

    def replicate(self, tree):
        """Places a tree (arrays, keys or a TrainState) on every device."""
        return jax.device_put(tree, self.replicated)

    def shard_batch(self, tree):
        """Splits the leading (batch) axis of every leaf across devices."""
        return jax.device_put(tree, self.batch)


def make_data_parallel(num_devices: int = 0) -> DataParallel:
    """A mesh over the first `num_devices` devices (0: all, across all processes)."""
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"train.num_devices={num_devices} but only {len(devices)} "
                             f"{jax.default_backend()} devices are visible; lower it or set "
                             "it to 0 to use them all.")
        devices = devices[:num_devices]
    return DataParallel(Mesh(np.asarray(devices), ("data",)))


def cpu_device_count(requested: int, batch_sizes: tuple[int, ...] = ()) -> int:
    """CPU devices to ask XLA for: `requested`, or, when it is 0, the most devices up to
    one per core that every batch size divides evenly.

    XLA:CPU runs small convolutions on one core; splitting the batch over several
    CPU devices uses the others (fvae.bench on 2 cores: 1.4x the images/s of one).
    It is not the default: with 2 devices on 2 cores, jaxlib 0.10.2 sometimes
    aborts training after 40 s stuck in the gradient all-reduce."""
    if requested:
        return requested
    divisor = math.gcd(*batch_sizes) if batch_sizes else 1
    most = max(1, os.cpu_count() or 1)
    return max(d for d in range(1, most + 1) if divisor % d == 0)


def configure_cpu_devices(requested: int, batch_sizes: tuple[int, ...] = ()) -> None:
    """Asks for several CPU devices; must run before JAX starts its backends."""
    try:
        jax.config.update("jax_num_cpu_devices", cpu_device_count(requested, batch_sizes))
    except RuntimeError as e:  # backends already started (e.g. inside a notebook)
        logging.warning("could not set the number of CPU devices (%s); using %d", e,
                        jax.local_device_count())


def setup_runtime(config) -> None:
    """What every entry point does before any JAX computation: multi-host start-up and
    the number of CPU devices (chosen so the config's batch sizes split evenly)."""
    initialize_distributed()
    configure_cpu_devices(config.train.cpu_devices,
                          (config.train.batch_size, config.train.eval_batch_size))


def initialize_distributed() -> bool:
    """Starts multi-host JAX when the environment describes a multi-process job."""
    env = os.environ
    wanted = (env.get("JAX_COORDINATOR_ADDRESS") or env.get("FVAE_DISTRIBUTED") == "1"
              or int(env.get("SLURM_NTASKS", "1")) > 1
              or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
    if not wanted:
        return False
    jax.distributed.initialize()
    logging.info("multi-host JAX: process %d of %d, %d local of %d devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    return True
