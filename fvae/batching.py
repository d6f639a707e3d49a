"""Running a (jitted) function over a large array in fixed-size batches."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np


def map_batches(fn: Callable, inputs: np.ndarray, batch_size: int, *, with_ids: bool = False,
                desc: str = "", progress: bool = False) -> Any:
    """fn(batch) (or fn(batch, ids) with `with_ids`) over `inputs` in batches of one size.

    The last batch is padded with zeros, so a jitted fn compiles once; the padded rows
    are dropped from its outputs (a pytree of arrays with a leading batch axis), which
    are concatenated into numpy arrays of len(inputs) rows.
    """
    from tqdm.auto import tqdm

    size = max(1, min(batch_size, len(inputs)))
    outputs = []
    with tqdm(total=len(inputs), desc=desc, unit="img", disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        for start in range(0, len(inputs), size):
            batch = inputs[start:start + size]
            n = len(batch)
            if n < size:
                batch = np.concatenate([batch, np.zeros((size - n, *batch.shape[1:]),
                                                        batch.dtype)])
            out = fn(batch, np.arange(start, start + size)) if with_ids else fn(batch)
            outputs.append(jax.tree.map(lambda a, n=n: np.asarray(a)[:n], out))
            bar.update(n)
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)
