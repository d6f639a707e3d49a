"""Running a (jitted) function over a large array in fixed-size batches, on one device
or dealt across several."""

from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

import jax
import numpy as np


def map_batches(fn: Callable, params: Any, inputs: np.ndarray, batch_size: int, *,
                with_ids: bool = False, devices: Sequence[jax.Device] = (),
                desc: str = "", progress: bool = False) -> Any:
    """fn(params, batch) (or fn(params, batch, ids) with `with_ids`) over `inputs` in
    batches of one size.

    The last batch is padded with zeros, so a jitted fn compiles once (per device); the
    padded rows are dropped from its outputs (a pytree of arrays with a leading batch
    axis), which are concatenated into numpy arrays of len(inputs) rows. With
    `devices`, batches are dealt to them in turn and run concurrently, each device on its
    own copy of `params` (a pytree: everything fn uses besides the batch); every batch is
    computed as on one device, so the result does not depend on the devices. Without,
    everything runs on JAX's default device.
    """
    from tqdm.auto import tqdm

    devices = list(devices) or [None]
    copies = [params if d is None else jax.device_put(params, d) for d in devices]
    size = max(1, min(batch_size, len(inputs)))
    outputs, in_flight = [], collections.deque()
    with tqdm(total=len(inputs), desc=desc, unit="img", disable=not progress, leave=False,
              dynamic_ncols=True) as bar:

        def collect():
            n, out = in_flight.popleft()
            outputs.append(jax.tree.map(lambda a: np.asarray(a)[:n], out))
            bar.update(n)

        for i, start in enumerate(range(0, len(inputs), size)):
            batch = inputs[start:start + size]
            n = len(batch)
            if n < size:
                batch = np.concatenate([batch, np.zeros((size - n, *batch.shape[1:]),
                                                        batch.dtype)])
            device = devices[i % len(devices)]
            if device is not None:
                batch = jax.device_put(batch, device)
            args = (copies[i % len(devices)], batch)
            in_flight.append((n, fn(*args, np.arange(start, start + size)) if with_ids
                              else fn(*args)))
            if len(in_flight) > len(devices):  # each device has its next batch queued
                collect()
        while in_flight:
            collect()
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)
