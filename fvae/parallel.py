"""Data parallelism: one mesh axis, 'data', over every device of every process.

The same code runs on 1 CPU, N CPU devices, 1 GPU or 8 GPUs: parameters, optimizer
state and the (small) training set are replicated and each batch is split across the
devices. Results equal the one-device run within float tolerance (the sum over the
batch is split differently). How the gradients are summed across devices:

- 'xla' (accelerators, several processes): the batch is sharded along 'data' and XLA
  inserts the gradient all-reduce.
- 'host' (the default for several CPU devices in one process, see
  runtime.cpu_devices): each device computes its part's gradients in its own program,
  the runtime copies them across and every device applies the same summed update. No
  XLA collective runs, because jaxlib 0.10.2's in-process CPU all-reduce sometimes
  deadlocks (and aborts after 40 s) with as many CPU devices as cores.

Multi-host (started by `fvae.runtime.initialize_distributed`): every process holds the
whole training set and draws the same permutation; each process's devices compute
only their own shard of every batch, so the data is sharded by process.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
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
    def partitioned_by_xla(self) -> bool:
        """Whether XLA's partitioner splits each step across the devices."""
        return self.num_devices > 1 and not self.host_reduce

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec("data"))

    def replicate(self, tree):
        """Places a tree (arrays, keys or a TrainState) on every device."""
        return place(tree, self.replicated)

    def shard_batch(self, tree):
        """Splits the leading (batch) axis of every leaf across devices."""
        return place(tree, self.batch)

    def local_copies(self, tree) -> list:
        """A replicated tree as one single-device tree per device (no copies made)."""
        def on(device):
            return lambda x: next(s.data for s in x.addressable_shards if s.device == device)
        return [jax.tree.map(on(device), tree) for device in self.devices]

    def from_local_copies(self, trees: list):
        """The inverse of local_copies: equal per-device trees as one replicated tree."""
        return jax.tree.map(lambda *xs: jax.make_array_from_single_device_arrays(
            xs[0].shape, self.replicated, list(xs)), *trees)


def place(tree, sharding: NamedSharding):
    """jax.device_put(tree, sharding), also when the mesh spans several processes: there
    each process holds the same host values and contributes its own devices' parts
    (device_put accepts only shardings whose devices are all this process's)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def to_global(x):
        if not hasattr(x, "dtype"):  # a Python scalar: the dtype device_put would give it
            x = jnp.asarray(x)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(to_global(jax.random.key_data(x)),
                                            impl=jax.random.key_impl(x))
        local = np.asarray(x)
        return jax.make_array_from_callback(local.shape, sharding, lambda i: local[i])

    return jax.tree.map(to_global, tree)


def host_local(tree):
    """A replicated tree as host values when the mesh spans several processes (so that
    one process alone can compute with it); unchanged in a one-process job."""
    return tree if jax.process_count() == 1 else jax.device_get(tree)


def local_devices(num_devices: int = 0) -> list[jax.Device]:
    """This process's devices among the first `num_devices` of all (0: all): where the
    work each process does alone, evaluation, is dealt (fvae.batching.map_batches)."""
    devices = jax.devices()[:num_devices or None]
    return [d for d in devices if d.process_index == jax.process_index()] \
        or jax.local_devices()[:1]


def make_data_parallel(num_devices: int = 0, reduce: str = "auto") -> DataParallel:
    """A mesh over the first `num_devices` devices (0: all, across all processes).

    `reduce` (runtime.cross_device_reduce) is 'host', 'xla', or 'auto': 'host' for several
    CPU devices in one process, 'xla' otherwise (see the module doc)."""
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"runtime.num_devices={num_devices} but only {len(devices)} "
                             f"{jax.default_backend()} devices are visible; lower it or set "
                             "it to 0 to use them all.")
        devices = devices[:num_devices]
    if reduce not in configs.CROSS_DEVICE_REDUCES:
        raise ValueError(f"runtime.cross_device_reduce={reduce!r}; use one of "
                         f"{configs.CROSS_DEVICE_REDUCES}.")
    if reduce == "host" and jax.process_count() > 1:
        raise ValueError("runtime.cross_device_reduce='host' sums gradients within one "
                         "process; a multi-process job needs 'xla' (or 'auto').")
    host = reduce == "host" or (reduce == "auto" and jax.default_backend() == "cpu"
                                and jax.process_count() == 1)
    return DataParallel(Mesh(np.asarray(devices), ("data",)), host and len(devices) > 1)
