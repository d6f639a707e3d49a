"""A run's randomness: independent key streams, all derived from `config.seed`.

The key for training step s is fold_in(keys.train, s) and the order of the training
images in epoch e is a permutation drawn from fold_in(keys.data, e). A run is
therefore fully described by (config, step), which is what makes exact resumption
possible: a resumed run needs only the step number to continue bit for bit.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class RunKeys:
    """The independent key streams of a run, all derived from config.seed."""
    init: jax.Array  # the initial parameters
    train: jax.Array  # fold_in(train, step) -> the step's sampling key
    data: jax.Array  # fold_in(data, epoch) -> the epoch's permutation
    eval: jax.Array  # fold_in(eval, batch) -> fixed noise for evaluation
    figures: jax.Array  # prior samples for figures

    @classmethod
    def from_seed(cls, seed: int) -> "RunKeys":
        root = jax.random.key(seed)
        return cls(*(jax.random.fold_in(root, i) for i in range(5)))


def epoch_permutation(data_key: jax.Array, epoch: int, num_train: int) -> jax.Array:
    """The order of the training images in epoch `epoch` (a pure function of it)."""
    return jax.random.permutation(jax.random.fold_in(data_key, epoch), num_train)
