"""Data parallelism: one mesh axis, 'data', over every device of every process.

The same code runs on 1 CPU, N CPU devices, 1 GPU or 8 GPUs: parameters, optimizer
state and the (small) training set are replicated and each batch is split across the
devices. Results equal the one-device run within float tolerance (the sum over the
batch is split differently). How the gradients are summed across devices:

- 'xla' (accelerators, several processes): the batch is sharded along 'data' and XLA
  inserts the gradient all-reduce.
- 'host' (several CPU devices in one process, the default there): each device computes
  its part's gradients in its own program, the runtime copies them across and every
  device applies the same summed update. No XLA collective runs, because jaxlib
  0.10.2's in-process CPU all-reduce sometimes deadlocks (and aborts after 40 s) with
  as many CPU devices as cores.

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

from fvae import configs


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """A 1-D device mesh, the two shardings training needs, and how gradients are
    summed across its devices (`host_reduce`: by the runtime, see the module doc)."""
    mesh: Mesh
    host_reduce: bool = False

    @property
    def devices(self) -> list[jax.Device]:
        return list(self.mesh.devices.flat)

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

    def local_copies(self, tree) -> list:
        """A replicated tree as one single-device tree per device (no copies made)."""
        def on(device):
            return lambda x: next(s.data for s in x.addressable_shards if s.device == device)
        return [jax.tree.map(on(device), tree) for device in self.devices]

    def from_local_copies(self, trees: list):
        """The inverse of local_copies: equal per-device trees as one replicated tree."""
        return jax.tree.map(lambda *xs: jax.make_array_from_single_device_arrays(
            xs[0].shape, self.replicated, list(xs)), *trees)


def make_data_parallel(num_devices: int = 0, reduce: str = "auto") -> DataParallel:
    """A mesh over the first `num_devices` devices (0: all, across all processes).

    `reduce` (train.cross_device_reduce) is 'host', 'xla', or 'auto': 'host' for several
    CPU devices in one process, 'xla' otherwise (see the module doc)."""
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"train.num_devices={num_devices} but only {len(devices)} "
                             f"{jax.default_backend()} devices are visible; lower it or set "
                             "it to 0 to use them all.")
        devices = devices[:num_devices]
    if reduce not in configs.CROSS_DEVICE_REDUCES:
        raise ValueError(f"train.cross_device_reduce={reduce!r}; use one of "
                         f"{configs.CROSS_DEVICE_REDUCES}.")
    if reduce == "host" and jax.process_count() > 1:
        raise ValueError("train.cross_device_reduce='host' sums gradients within one "
                         "process; a multi-process job needs 'xla' (or 'auto').")
    host = reduce == "host" or (reduce == "auto" and jax.default_backend() == "cpu"
                                and jax.process_count() == 1)
    return DataParallel(Mesh(np.asarray(devices), ("data",)), host and len(devices) > 1)


def cpu_device_count(requested: int, batch_sizes: tuple[int, ...] = ()) -> int:
    """CPU devices to ask XLA for: `requested`, or, when it is 0, the most devices up to
    one per core that every batch size divides evenly.

    XLA:CPU runs small convolutions on one core; splitting the batch over several
    CPU devices uses the others (fvae.bench on 2 cores: about 1.45x the images/s of
    one)."""
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
