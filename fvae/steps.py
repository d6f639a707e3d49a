"""The train state and the pure, jitted steps: train_step(state, batch, key) -> (state,
metrics), the per-image evaluation step, and the compiled chunk of steps the loop runs.

One seed is the usual case and runs the plain step; several seeds that differ only in
`seed` step together as one vmapped computation over a leading seed axis
(fvae.train.train_seeds; `Seeds` says how the loop holds their arrays). The
training set stays on the device and is passed to the chunk as an argument; each
step gathers its batch from the epoch's permutation (fvae.keys).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from flax import serialization

from fvae import binarize, losses, models, parallel
from fvae.batching import map_batches

Metrics = dict[str, jax.Array]
TRAIN_METRICS = ("loss", "recon", "kl", "beta", "elbo", "grad_norm", "skipped")


class TrainState(train_state.TrainState):
    """params, optimizer state and step (flax's TrainState; apply_fn unused)."""


def make_optimizer(optim_config: ml_collections.ConfigDict,
                   total_steps: int) -> optax.GradientTransformation:
    """The optax optimizer and learning-rate schedule the config names."""
    lr, warmup = optim_config.learning_rate, optim_config.lr_warmup_steps
    if optim_config.lr_schedule == "cosine":
        lr = optax.cosine_decay_schedule(lr, max(1, total_steps))
    elif optim_config.lr_schedule == "warmup_cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(warmup + 1, total_steps))
    if optim_config.name == "adam":
        opt = optax.adam(lr)
    elif optim_config.name == "adamw":
        opt = optax.adamw(lr, weight_decay=optim_config.weight_decay)
    else:
        opt = optax.sgd(lr, momentum=0.9)
    if optim_config.grad_clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(optim_config.grad_clip_norm), opt)
    return opt


def create_train_state(config: ml_collections.ConfigDict, model: models.VAE,
                       key: jax.Array, total_steps: int) -> TrainState:
    params = models.init_params(model, key)
    return TrainState.create(apply_fn=model.apply, params=params,
                             tx=make_optimizer(config.optim, total_steps))


def zero_metrics() -> Metrics:
    return {name: jnp.zeros((), jnp.float32) for name in TRAIN_METRICS}


def state_tree(state: TrainState, epoch_sums: Metrics) -> dict:
    """What a checkpoint holds: the train state as a state dict, plus epoch sums."""
    return {"train_state": serialization.to_state_dict(state),
            "epoch_sums": dict(epoch_sums)}


def abstract_state_tree(config: ml_collections.ConfigDict, model: models.VAE) -> dict:
    """A tree shaped like a checkpoint of this config (the target for restoring)."""
    state = jax.eval_shape(lambda k: create_train_state(config, model, k, 1),
                           jax.random.key(0))
    zeros = lambda s: jnp.zeros(s.shape, s.dtype)  # noqa: E731
    return state_tree(jax.tree.map(zeros, state), zero_metrics())


# ---------------------------------------------------------------- seed axis
def stack_seeds(trees: Sequence):
    """One tree with a leading seed axis, from one tree per seed."""
    if isinstance(trees[0], TrainState):  # optimizers are equal but not identical objects
        return trees[0].replace(**{field: stack_seeds([getattr(t, field) for t in trees])
                                   for field in ("step", "params", "opt_state")})
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@functools.partial(jax.jit, static_argnames="i")
def _seed_slice(tree, i: int):
    return jax.tree.map(lambda x: x[i], tree)


@dataclasses.dataclass(frozen=True)
class Seeds:
    """How the arrays of `count` seeds trained together are held: stacked on a leading
    seed axis for several (the vmapped step), as they are for one (the plain step). A
    seed axis of one, squeezed inside the compiled step, cost 88 more copies per step
    and ~5% of the speed on CPU (fvae.bench, 5ce2280 vs this layout)."""
    count: int

    def stack(self, trees: Sequence):
        """One tree for all the seeds, from one tree per seed."""
        if len(trees) != self.count:
            raise ValueError(f"{len(trees)} trees for {self.count} seeds")
        return trees[0] if self.count == 1 else stack_seeds(trees)

    def slice(self, tree, i: int):
        """Seed i's part of a tree built by `stack` (one compiled call)."""
        return tree if self.count == 1 else _seed_slice(tree, i)


# ---------------------------------------------------------------- the steps
@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The pure training step, train_step(state, batch, key) -> (state, metrics), in two
    halves so that gradients can be summed across devices between them:
    `grads(params, step, batch, key, shard)` -> (grads, loss parts) of part `shard` of the
    batch, and `apply(state, grads, parts)` -> (state, metrics)."""
    grads: Callable
    apply: Callable

    def __call__(self, state: TrainState, batch: jax.Array, key: jax.Array):
        return self.apply(state, *self.grads(state.params, state.step, batch, key))


def make_train_step(model: models.VAE, loss_config: ml_collections.ConfigDict,
                    beta_schedule: Callable[[jax.Array], jax.Array],
                    skip_nonfinite: bool = False, binarize_inputs: bool = False) -> TrainStep:
    """Returns the pure TrainStep.

    With `binarize_inputs`, each uint8 batch is replaced by a fresh Bernoulli draw
    (dynamic binarisation) from a key derived from the step's key.

    With `skip_nonfinite`, a step whose loss or gradient is not finite leaves the
    parameters and optimizer state unchanged (the step counter still advances, so
    data order and keys stay those of an uninterrupted run) and counts as `skipped`.
    """

    def grads(params, step: jax.Array, batch: jax.Array, key: jax.Array,
              shard: models.Shard = (0, 1)):
        """Gradients of the batch-mean loss over part i of n equal parts of `batch`
        (`shard` = (i, n)); the mean of the n parts' results is the whole batch's."""
        if binarize_inputs:  # drawn for the whole batch, so every part sees its own rows
            batch = binarize.binarize(jax.random.fold_in(key, 1), batch)
        x = models.to_float(models.take_shard(batch, shard))
        beta = beta_schedule(step)

        def loss_fn(params):
            logits, mean, logvar = model.apply({"params": params}, x, key, shard)
            return losses.vae_loss(logits, mean, logvar, x, beta, loss_config)

        return jax.grad(loss_fn, has_aux=True)(params)

    def apply(state: TrainState, grads, parts: Metrics):
        parts = {**parts, "grad_norm": optax.tree.norm(grads)}
        new_state = state.apply_gradients(grads=grads)
        parts["skipped"] = jnp.zeros((), jnp.float32)
        if skip_nonfinite:
            ok = jnp.isfinite(parts["loss"]) & jnp.isfinite(parts["grad_norm"])
            new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state,
                                     state.replace(step=state.step + 1))
            parts = {k: jnp.where(ok, v, 0.0) for k, v in parts.items()}
            parts["skipped"] = 1.0 - ok.astype(jnp.float32)
        return new_state, parts

    return TrainStep(grads, apply)


def make_eval_step(model: models.VAE, loss_config: ml_collections.ConfigDict):
    """Returns eval_step(params, batch, key, beta) -> per-image loss parts [B] (jitted)."""

    @jax.jit
    def eval_step(params, batch: jax.Array, key: jax.Array, beta):
        x = models.to_float(batch)
        logits, mean, logvar = model.apply({"params": params}, x, key)
        return losses.per_image_terms(logits, mean, logvar, x, beta, loss_config)

    return eval_step


def evaluate_losses(eval_step, params, images: np.ndarray, batch_size: int, key: jax.Array,
                    beta: float, devices: Sequence[jax.Device] = ()) -> dict[str, float]:
    """Mean loss parts over all `images`; batch b draws its noise from fold_in(key, b).
    Batches are dealt across `devices` (fvae.batching), each computed as on one device."""
    size = max(1, min(batch_size, len(images)))

    def per_batch(params_key, batch, ids):
        params, key = params_key
        return eval_step(params, batch, jax.random.fold_in(key, int(ids[0]) // size), beta)

    terms = map_batches(per_batch, (params, key), images, size, with_ids=True,
                        devices=devices)
    return {name: float(np.mean(values, dtype=np.float64)) for name, values in terms.items()}


def default_steps_per_dispatch(steps_per_epoch: int) -> int:
    """One step per call on CPU (measured faster there); a whole epoch elsewhere."""
    return 1 if jax.default_backend() == "cpu" else steps_per_epoch


# ---------------------------------------------------------------- compiled chunks
def gather_batch(step: jax.Array, images: jax.Array, perm: jax.Array, batch_size: int,
                 steps_per_epoch: int) -> jax.Array:
    """The step's batch: its slice of the epoch's permutation of the resident images."""
    offset = (step % steps_per_epoch) * batch_size
    return images[jax.lax.dynamic_slice_in_dim(perm, offset, batch_size)]


def make_train_chunk(train_step: TrainStep, batch_size: int, steps_per_epoch: int,
                     dp: parallel.DataParallel | None = None, num_seeds: int = 1):
    """train_chunk(state, images, perm, train_key, num_steps) -> (state, summed metrics):
    `num_steps` steps from state.step, each batch gathered on device from the resident
    training set. State, perm and train_key are held as `Seeds(num_seeds)` holds them.

    With a several-device `dp`, the state and inputs are replicated and each batch is
    split across the devices; gradients are summed by XLA (one jitted call) or, with
    dp.host_reduce, by the runtime (`make_host_reduce_chunk`). Several seeds step as one
    vmapped computation over the shared images; one seed runs the plain step.
    """
    if dp is not None and dp.host_reduce:
        if num_seeds > 1:
            raise ValueError("vmapped seeds need one device or "
                             "runtime.cross_device_reduce='xla'")
        return make_host_reduce_chunk(train_step, batch_size, steps_per_epoch, dp)
    batch_sharding = dp.batch if dp is not None and dp.num_devices > 1 else None

    def one_step(state, images, perm, train_key):
        batch = gather_batch(state.step, images, perm, batch_size, steps_per_epoch)
        if batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        return train_step(state, batch, jax.random.fold_in(train_key, state.step))

    def chunk(state, images, perm, train_key, num_steps: int):
        if num_steps == 1:
            return one_step(state, images, perm, train_key)

        def body(carry, _):
            state, total = carry
            state, metrics = one_step(state, images, perm, train_key)
            return (state, jax.tree.map(jnp.add, total, metrics)), None

        _, zeros = jax.eval_shape(one_step, state, images, perm, train_key)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
        (state, total), _ = jax.lax.scan(body, (state, zeros), None, length=num_steps)
        return state, total

    @functools.partial(jax.jit, static_argnames="num_steps", donate_argnums=0)
    def train_chunk(state, images, perm, train_key, num_steps: int):
        run = functools.partial(chunk, num_steps=num_steps)
        if num_seeds > 1:
            return jax.vmap(run, in_axes=(0, None, 0, 0))(state, images, perm, train_key)
        return run(state, images, perm, train_key)

    return train_chunk


def make_host_reduce_chunk(train_step: TrainStep, batch_size: int, steps_per_epoch: int,
                           dp: parallel.DataParallel):
    """train_chunk as make_train_chunk's (one seed), with gradients summed across CPU
    devices without XLA collectives (see fvae.parallel).

    Each step, device i runs one program for part i of the batch (its gradients and
    loss parts), the runtime copies every part's results to every device, and each
    device averages them in the same order and applies the same update, so the
    replicas stay bit-identical. Same signature, inputs and outputs (replicated
    arrays) as the single-program chunk.
    """
    devices, n = dp.devices, dp.num_devices

    @functools.partial(jax.jit, static_argnames="index")
    def part_grads(state, images, perm, train_key, index: int):
        batch = gather_batch(state.step, images, perm, batch_size, steps_per_epoch)
        return train_step.grads(state.params, state.step, batch,
                                jax.random.fold_in(train_key, state.step), (index, n))

    @functools.partial(jax.jit, donate_argnums=0)  # as the one-program chunk donates it
    def apply_mean(state, results):
        grads, parts = jax.tree.map(lambda *xs: sum(xs) / n, *results)
        return train_step.apply(state, grads, parts)

    def train_chunk(state, images, perm, train_key, num_steps: int):
        # Waiting for the previous chunk keeps one chunk in flight: dispatching many
        # ahead held ~190 MB more at the peak (fvae.bench), for no gain in speed.
        states = jax.block_until_ready(dp.local_copies(state))
        inputs = list(zip(*(dp.local_copies(x) for x in (images, perm, train_key))))
        total = None
        for _ in range(num_steps):
            results = [part_grads(states[i], *inputs[i], index=i) for i in range(n)]
            stepped = [apply_mean(states[i], jax.device_put(results, device))
                       for i, device in enumerate(devices)]
            states = [s for s, _ in stepped]
            metrics = [m for _, m in stepped]
            total = metrics if total is None else [
                jax.tree.map(jnp.add, t, m) for t, m in zip(total, metrics)]
        return dp.from_local_copies(states), dp.from_local_copies(total)

    return train_chunk


@jax.jit
def all_finite(tree) -> jax.Array:
    """Whether every element of every leaf is finite, in one compiled call (a norm would
    overflow for large finite values; op by op it cost ~0.1 s a checkpoint)."""
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))
