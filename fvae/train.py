"""Training and evaluation: a jitted, pure step and the loop around it.

Randomness is explicit and derived from `config.seed` alone: the key for step s is
fold_in(train_key, s) and the data order of epoch e is a permutation drawn from
fold_in(data_key, e). A run is therefore fully described by (config, step), which is
what makes exact resumption possible. The training set is put on the device once and
passed to the compiled chunk as an argument; `steps_per_dispatch` steps run per
compiled call, and host work (logging, progress) happens between calls.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import pathlib
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from fvae import configs, data, losses, models, plots
from fvae.writer import MetricsWriter

Metrics = dict[str, jax.Array]


class TrainState(train_state.TrainState):
    """params, optimizer state and step (flax's TrainState; apply_fn unused)."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the parts."""


@dataclasses.dataclass(frozen=True)
class RunKeys:
    """The independent key streams of a run, all derived from config.seed."""
    init: jax.Array
    train: jax.Array  # fold_in(train, step) -> the step's sampling key
    data: jax.Array  # fold_in(data, epoch) -> the epoch's permutation
    eval: jax.Array  # fold_in(eval, batch) -> fixed noise for evaluation
    figures: jax.Array  # prior samples for figures

    @classmethod
    def from_seed(cls, seed: int) -> "RunKeys":
        root = jax.random.key(seed)
        return cls(*(jax.random.fold_in(root, i) for i in range(5)))


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How many steps a run has and how they fall into epochs."""
    steps_per_epoch: int
    total_steps: int

    @property
    def num_epochs(self) -> int:
        return -(-self.total_steps // self.steps_per_epoch)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, num_train: int) -> "Schedule":
        steps_per_epoch = num_train // config.train.batch_size
        total = config.train.num_steps or config.train.num_epochs * steps_per_epoch
        return cls(steps_per_epoch, total)


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


def make_train_step(model: models.VAE, loss_config: ml_collections.ConfigDict,
                    beta_schedule: Callable[[jax.Array], jax.Array]):
    """Returns the pure train_step(state, batch, key) -> (state, metrics)."""

    def train_step(state: TrainState, batch: jax.Array, key: jax.Array):
        x = models.to_float(batch)
        beta = beta_schedule(state.step)

        def loss_fn(params):
            logits, mean, logvar = model.apply({"params": params}, x, key)
            return losses.vae_loss(logits, mean, logvar, x, beta, loss_config)

        grads, parts = jax.grad(loss_fn, has_aux=True)(state.params)
        parts["grad_norm"] = optax.tree.norm(grads)
        return state.apply_gradients(grads=grads), parts

    return train_step


def make_eval_step(model: models.VAE, loss_config: ml_collections.ConfigDict):
    """Returns eval_step(params, batch, mask, key, beta) -> metrics summed over the mask."""

    def eval_step(params, batch: jax.Array, mask: jax.Array, key: jax.Array, beta):
        x = models.to_float(batch)
        logits, mean, logvar = model.apply({"params": params}, x, key)
        terms = losses.per_image_terms(logits, mean, logvar, x, beta, loss_config)
        sums = {name: jnp.sum(value * mask) for name, value in terms.items()}
        sums["count"] = jnp.sum(mask)
        return sums

    return eval_step


def epoch_permutation(data_key: jax.Array, epoch: int, num_train: int) -> jax.Array:
    """The order of the training images in epoch `epoch` (a pure function of it)."""
    return jax.random.permutation(jax.random.fold_in(data_key, epoch), num_train)


def make_train_chunk(train_step, batch_size: int, steps_per_epoch: int):
    """Jitted: run `num_steps` steps from state.step, batches gathered on device.

    Returns the new state and the metrics summed over the chunk.
    """

    def one_step(state, images, perm, train_key):
        offset = (state.step % steps_per_epoch) * batch_size
        batch = images[jax.lax.dynamic_slice_in_dim(perm, offset, batch_size)]
        return train_step(state, batch, jax.random.fold_in(train_key, state.step))

    @functools.partial(jax.jit, static_argnames="num_steps", donate_argnums=0)
    def train_chunk(state, images, perm, train_key, num_steps: int):
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

    return train_chunk


def default_steps_per_dispatch(steps_per_epoch: int) -> int:
    """One step per call on CPU (measured faster there); a whole epoch elsewhere."""
    return 1 if jax.default_backend() == "cpu" else steps_per_epoch


def evaluate(eval_step, params, images: np.ndarray, batch_size: int, key: jax.Array,
             beta: float) -> dict[str, float]:
    """Mean loss parts over all `images` with a jitted eval_step; the last batch is
    padded and masked out."""
    totals = None
    for i, start in enumerate(range(0, len(images), batch_size)):
        batch = images[start:start + batch_size]
        mask = np.ones(batch_size, np.float32)
        if len(batch) < batch_size:
            mask[len(batch):] = 0.0
            batch = np.concatenate([batch, np.zeros((batch_size - len(batch), *batch.shape[1:]),
                                                    batch.dtype)])
        sums = eval_step(params, batch, mask, jax.random.fold_in(key, i), beta)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    count = float(totals.pop("count"))
    return {name: float(value) / count for name, value in totals.items()}


def check_finite(metrics: dict[str, float], step: int) -> None:
    """Raises NonFiniteLossError naming the step and every loss part."""
    if not all(math.isfinite(v) for v in metrics.values()):
        parts = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
        raise NonFiniteLossError(
            f"non-finite loss by step {step}: {parts}. Lower optim.learning_rate or set "
            "optim.grad_clip_norm; the last good checkpoint is kept.")


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                dynamic_ncols=True, leave=True)


def write_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json(indent=2, sort_keys=True) + "\n")


def save_figures(model, params, config, dataset: data.Dataset, keys: RunKeys,
                 workdir: pathlib.Path) -> None:
    """Reconstruction and sample grids of the final parameters."""
    n = min(config.train.num_figure_images, len(dataset.test_images))
    mean_fn = functools.partial(losses.pixel_mean, loss_config=config.loss)
    originals = dataset.test_images[:n]
    recons = models.reconstruct(model, params, originals, mean_fn=mean_fn)
    samples = models.sample(model, params, keys.figures,
                            config.train.num_figure_images, config.model.latent_dim,
                            mean_fn=mean_fn)
    figures = workdir / "figures"
    plots.reconstruction_grid(originals / 255.0, np.asarray(recons),
                              figures / "reconstructions.png",
                              title=f"{config.name}: test images and reconstructions")
    plots.sample_grid(np.asarray(samples), figures / "samples.png",
                      title=f"{config.name}: samples from the prior")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains the config's model, evaluating on the test split after every epoch.

    Writes workdir/config.json, workdir/metrics.jsonl (one line per epoch and split)
    and workdir/figures/{reconstructions,samples}.png; returns the final state.
    """
    configs.validate(config)
    workdir = pathlib.Path(workdir)
    dataset = data.load(config)
    configs.check_against_data(config, len(dataset.train_images))
    write_config(config, workdir)

    schedule = Schedule.from_config(config, len(dataset.train_images))
    keys = RunKeys.from_seed(config.seed)
    model = models.build_model(config.model)
    state = create_train_state(config, model, keys.init, schedule.total_steps)
    beta_schedule = losses.make_beta_schedule(config.loss, schedule.steps_per_epoch,
                                              schedule.total_steps)
    train_chunk = make_train_chunk(make_train_step(model, config.loss, beta_schedule),
                                   config.train.batch_size, schedule.steps_per_epoch)
    eval_step = jax.jit(make_eval_step(model, config.loss))
    per_dispatch = config.train.steps_per_dispatch or \
        default_steps_per_dispatch(schedule.steps_per_epoch)

    train_images = jax.device_put(dataset.train_images)
    writer = MetricsWriter(workdir)
    logging.info("training %s for %d steps (%d epochs of %d steps) in %s", config.name,
                 schedule.total_steps, schedule.num_epochs, schedule.steps_per_epoch, workdir)
    start_time = time.time()
    step = int(state.step)
    with _progress(schedule.total_steps, step, config.train.progress_bar) as bar:
        while step < schedule.total_steps:
            epoch = step // schedule.steps_per_epoch
            epoch_end = min((epoch + 1) * schedule.steps_per_epoch, schedule.total_steps)
            perm = epoch_permutation(keys.data, epoch, len(dataset.train_images))
            epoch_start, epoch_t0, sums = step, time.time(), None
            while step < epoch_end:
                n = min(per_dispatch, epoch_end - step)
                state, chunk = train_chunk(state, train_images, perm, keys.train, num_steps=n)
                sums = chunk if sums is None else jax.tree.map(jnp.add, sums, chunk)
                step += n
                if step % config.train.log_every_steps < n or step == epoch_end:
                    running = {k: float(v) / (step - epoch_start) for k, v in sums.items()}
                    check_finite(running, step)
                    bar.set_postfix(loss=f"{running['loss']:.2f}", epoch=epoch + 1)
                bar.update(n)
            jax.block_until_ready(state)
            seconds = time.time() - epoch_t0
            done = step - epoch_start
            train_metrics = {k: float(v) / done for k, v in sums.items()}
            common = {"epoch": epoch + 1, "step": step,
                      "wall_time": time.time() - start_time}
            writer.write({"split": "train", **common, **train_metrics,
                          "images_per_sec": done * config.train.batch_size / seconds})
            beta_now = float(beta_schedule(step - 1))
            test_metrics = evaluate(eval_step, state.params, dataset.test_images,
                                    config.train.eval_batch_size, keys.eval, beta_now)
            writer.write({"split": "test", **common, **test_metrics, "beta": beta_now})
            bar.write(f"epoch {epoch + 1}: train loss {train_metrics['loss']:.2f}, "
                      f"test loss {test_metrics['loss']:.2f}, test elbo "
                      f"{test_metrics['elbo']:.2f} nats, "
                      f"{common['step']} steps, {done * config.train.batch_size / seconds:.0f} img/s")

    save_figures(model, state.params, config, dataset, keys, workdir)
    return state
