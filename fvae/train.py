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
import signal
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from flax import serialization

from fvae import (binarize, checkpoint, configs, cpu_kernels, data, evaluate, losses, models,
                  parallel)
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

    def log_resume_step(self, step: int) -> int:
        """The last step whose log lines a run resumed at `step` keeps: `step`, or, when
        `step` falls inside an epoch this run finishes (a shorter run ended there and
        wrote that partial epoch's lines), the epoch's start: the lines are written
        again, whole, when the epoch ends (its sums were saved unreset)."""
        if step < self.total_steps:
            return step - step % self.steps_per_epoch
        return step

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, num_train: int) -> "Schedule":
        return cls(*configs.run_steps(config, num_train))


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


def build_training_model(config: ml_collections.ConfigDict,
                         dp: parallel.DataParallel) -> models.VAE:
    """The config's model with the convolutions training on `dp` runs: fvae's CPU kernels
    (train.cpu_conv3x3) unless XLA partitions the step, whose partitioner would gather
    the whole batch on every device for them."""
    kernels = "xla" if dp.partitioned_by_xla else config.train.cpu_conv3x3
    return models.build_model(config.model, cpu_kernels.convolutions_for(kernels))


def create_train_state(config: ml_collections.ConfigDict, model: models.VAE,
                       key: jax.Array, total_steps: int) -> TrainState:
    params = models.init_params(model, key)
    return TrainState.create(apply_fn=model.apply, params=params,
                             tx=make_optimizer(config.optim, total_steps))


TRAIN_METRICS = ("loss", "recon", "kl", "beta", "elbo", "grad_norm", "skipped")


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
    """Returns eval_step(params, batch, mask, key, beta, shard) -> metrics summed over the
    mask, for a batch that is part `shard` = (i, n) of an evaluation batch."""

    def eval_step(params, batch: jax.Array, mask: jax.Array, key: jax.Array, beta,
                  shard: models.Shard = (0, 1)):
        x = models.to_float(batch)
        logits, mean, logvar = model.apply({"params": params}, x, key, shard)
        terms = losses.per_image_terms(logits, mean, logvar, x, beta, loss_config)
        sums = {name: jnp.sum(value * mask) for name, value in terms.items()}
        sums["count"] = jnp.sum(mask)
        return sums

    return eval_step


def epoch_permutation(data_key: jax.Array, epoch: int, num_train: int) -> jax.Array:
    """The order of the training images in epoch `epoch` (a pure function of it)."""
    return jax.random.permutation(jax.random.fold_in(data_key, epoch), num_train)


def make_train_chunk(train_step: TrainStep, batch_size: int, steps_per_epoch: int,
                     dp: parallel.DataParallel | None = None, vmap_seeds: bool = False):
    """train_chunk(state, images, perm, train_key, num_steps) -> (state, summed metrics):
    `num_steps` steps from state.step, each batch gathered on device from the resident
    training set.

    With a several-device `dp`, the state and inputs are replicated and each batch is
    split across the devices; gradients are summed by XLA (one jitted call) or, with
    dp.host_reduce, by the runtime (`make_host_reduce_chunk`). With `vmap_seeds`, the
    state, permutation and key carry a leading seed axis and all seeds step together as
    one vmapped computation over the shared images.
    """
    if dp is not None and dp.host_reduce:
        if vmap_seeds:
            raise ValueError("vmapped seeds need one device or train.cross_device_reduce="
                             "'xla'")
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
        if vmap_seeds:
            run = jax.vmap(run, in_axes=(0, None, 0, 0))
        return run(state, images, perm, train_key)

    return train_chunk


def gather_batch(step: jax.Array, images: jax.Array, perm: jax.Array, batch_size: int,
                 steps_per_epoch: int) -> jax.Array:
    """The step's batch: its slice of the epoch's permutation of the resident images."""
    offset = (step % steps_per_epoch) * batch_size
    return images[jax.lax.dynamic_slice_in_dim(perm, offset, batch_size)]


def make_host_reduce_chunk(train_step: TrainStep, batch_size: int, steps_per_epoch: int,
                           dp: parallel.DataParallel):
    """train_chunk as make_train_chunk's, with gradients summed across CPU devices
    without XLA collectives (see fvae.parallel).

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


def stack_seeds(trees: Sequence, vmapped: bool):
    """One tree with a leading seed axis (or, for a single run, that run's tree)."""
    if not vmapped:
        return trees[0]
    if isinstance(trees[0], TrainState):  # optimizers are equal but not identical objects
        return trees[0].replace(**{field: stack_seeds([getattr(t, field) for t in trees], True)
                                   for field in ("step", "params", "opt_state")})
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def seed_slice(tree, i: int, vmapped: bool):
    """Seed i's part of a tree built by stack_seeds."""
    return jax.tree.map(lambda x: x[i], tree) if vmapped else tree


def zero_metrics() -> Metrics:
    return {name: jnp.zeros((), jnp.float32) for name in TRAIN_METRICS}


def mean_metrics(sums: Metrics, num_steps: int) -> dict[str, float]:
    """Per-step means of summed train metrics, over the steps that were not skipped."""
    sums = {k: float(v) for k, v in sums.items()}
    skipped = sums.pop("skipped")
    counted = num_steps - skipped
    means = {k: (v / counted if counted else float("nan")) for k, v in sums.items()}
    return {**means, "skipped": int(skipped)}


def chunk_length(step: int, epoch_start: int, epoch_end: int, per_dispatch: int) -> int:
    """Steps in the next compiled call; chunks are aligned to the epoch start so a
    resumed run (which always resumes at a chunk boundary) chunks the same way."""
    return min(per_dispatch - (step - epoch_start) % per_dispatch, epoch_end - step)


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT stopped training after a checkpoint was saved."""

    def __init__(self, signum: int, step: int, saved: bool):
        self.signum, self.step, self.saved = signum, step, saved
        how = ("a checkpoint was saved; rerun the same command to resume" if saved else
               "checkpointing is off, so this progress is lost")
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}: {how}.")


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag checked between steps; a second signal of the
    same kind acts as usual (a second Ctrl-C raises KeyboardInterrupt at once)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def default_steps_per_dispatch(steps_per_epoch: int) -> int:
    """One step per call on CPU (measured faster there); a whole epoch elsewhere."""
    return 1 if jax.default_backend() == "cpu" else steps_per_epoch


def evaluate_losses(eval_step, params, images: np.ndarray, batch_size: int, key: jax.Array,
                    beta: float, dp: parallel.DataParallel | None = None) -> dict[str, float]:
    """Mean loss parts over all `images` with a jitted eval_step; the last batch is
    padded and masked out. With `dp`, each batch is split across its devices (as
    sharded arrays, or with dp.host_reduce one part per device, summed on the host)."""
    host_parts = dp.num_devices if dp is not None and dp.host_reduce else 1
    local_params = dp.local_copies(params) if host_parts > 1 else [params]
    totals = [None] * len(local_params)  # per device part, summed on that device
    for i, start in enumerate(range(0, len(images), batch_size)):
        batch = images[start:start + batch_size]
        mask = np.ones(batch_size, np.float32)
        if len(batch) < batch_size:
            mask[len(batch):] = 0.0
            batch = np.concatenate([batch, np.zeros((batch_size - len(batch), *batch.shape[1:]),
                                                    batch.dtype)])
        if host_parts > 1:  # one part per device, sliced on the host
            rows = batch_size // host_parts
            parts = [jax.device_put((batch[p * rows:(p + 1) * rows],
                                     mask[p * rows:(p + 1) * rows]), device)
                     for p, device in enumerate(dp.devices)]
        else:
            parts = [(batch, mask) if dp is None else dp.shard_batch((batch, mask))]
        for part, (part_params, inputs) in enumerate(zip(local_params, parts)):
            sums = eval_step(part_params, *inputs, jax.random.fold_in(key, i), beta,
                             shard=(part, host_parts))
            totals[part] = sums if totals[part] is None else \
                jax.tree.map(jnp.add, totals[part], sums)
    total = {name: sum(float(t[name]) for t in totals) for name in totals[0]}
    count = total.pop("count")
    return {name: value / count for name, value in total.items()}


@jax.jit
def all_finite(tree) -> jax.Array:
    """Whether every element of every leaf is finite, in one compiled call (a norm would
    overflow for large finite values; op by op it cost ~0.1 s a checkpoint)."""
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def check_finite(metrics: dict[str, float], step: int, params=None,
                 seed: int | None = None) -> None:
    """Raises NonFiniteLossError naming the step (and seed) and every loss part."""
    finite_params = params is None or bool(all_finite(params))
    if not finite_params or not all(math.isfinite(v) for v in metrics.values()):
        parts = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
        raise NonFiniteLossError(
            f"non-finite loss by step {step}{'' if seed is None else f' of seed {seed}'}: "
            f"{parts}"
            f"{'' if finite_params else ' (and non-finite parameters)'}. Lower "
            "optim.learning_rate, set optim.grad_clip_norm, or set "
            "train.on_nonfinite='skip'; the last good checkpoint is kept.")


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                dynamic_ncols=True, leave=True)


def write_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json(indent=2, sort_keys=True) + "\n")


def save_figures(model, params, config, dataset: data.Dataset, keys: RunKeys,
                 workdir: pathlib.Path, writer: MetricsWriter, step: int) -> None:
    """Every per-run figure (fvae.plots) and TensorBoard images of the final parameters."""
    from fvae import plots  # here: importing fvae.train must not set matplotlib's backend

    figures = workdir / "figures"
    plots.write_figures(model, params, config, dataset, figures, keys.figures,
                        num_images=config.train.num_figure_images)
    plots.loss_curves(workdir, figures / "loss_curves.png", title=f"{config.name}: training curves")
    n = min(config.train.num_figure_images, len(dataset.test_images))
    mean_fn = functools.partial(losses.pixel_mean, loss_config=config.loss)
    originals = dataset.test_images[:n]
    recons = np.asarray(models.reconstruct(model, params, originals, mean_fn=mean_fn))
    writer.add_images("test/reconstructions", np.concatenate(
        [originals / 255.0, recons.reshape(originals.shape)]), step, ncols=n)
    writer.add_images("prior/samples", np.asarray(models.sample(
        model, params, keys.figures, n, config.model.latent_dim, mean_fn=mean_fn)), step)


def prepare_workdir(workdir: str | pathlib.Path) -> pathlib.Path:
    """Creates the workdir and checks it is writable, before any work is done."""
    workdir = pathlib.Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test.{jax.process_index()}"  # one per process
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise checkpoint.CheckpointError(
            f"the workdir {workdir} is not writable ({e}). Choose another --workdir.") from e
    return workdir


def abstract_checkpoint_tree(config: ml_collections.ConfigDict, model: models.VAE):
    """A tree shaped like a checkpoint of this config (the target for restoring)."""
    state = jax.eval_shape(lambda k: create_train_state(config, model, k, 1),
                           jax.random.key(0))
    zeros = lambda s: jnp.zeros(s.shape, s.dtype)  # noqa: E731
    return checkpoint.state_tree(jax.tree.map(zeros, state), zero_metrics())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains the config's model, evaluating on the test split after every epoch.

    Writes workdir/config.json, workdir/metrics.jsonl (one line per epoch and split),
    checkpoints under workdir/checkpoints/ and workdir/figures/*.png. Resumes from the
    latest checkpoint in workdir if there is one. Returns the final state.
    """
    return train_seeds([config], [workdir])[0]


def check_same_but_seed(run_configs: Sequence[ml_collections.ConfigDict]) -> None:
    """Raises ConfigError unless the configs differ in `seed` alone."""
    flat = [configs.flatten(c) for c in run_configs]
    for other in flat[1:]:
        differ = sorted(k for k in set(flat[0]) | set(other)
                        if k != "seed" and flat[0].get(k) != other.get(k))
        if differ:
            raise configs.ConfigError(
                f"runs trained together must differ only in seed, but these keys differ: "
                f"{differ}. Train them separately.")
    seeds = [c.seed for c in run_configs]
    if len(set(seeds)) != len(seeds):
        raise configs.ConfigError(f"runs trained together need distinct seeds, got {seeds}.")


def train_seeds(run_configs: Sequence[ml_collections.ConfigDict],
                workdirs: Sequence[str | pathlib.Path]) -> list[TrainState]:
    """Trains runs that differ only in `seed` as one vmapped computation.

    Each run writes its own workdir exactly as train_and_evaluate does (metrics,
    checkpoints, figures) and resumes from its own checkpoints. Every seed gets the keys
    and data order of its own separate run; results equal separate runs within float
    tolerance (the vmapped convolutions sum in another order). Where that cannot be done
    (several devices, or checkpoints at different steps) the runs are trained one after
    another. Returns each run's final state.
    """
    if len(run_configs) != len(workdirs) or not run_configs:
        raise ValueError(f"{len(run_configs)} configs for {len(workdirs)} workdirs")
    if len({pathlib.Path(w).resolve() for w in workdirs}) != len(workdirs):
        raise ValueError(f"runs trained together need one workdir each, got {workdirs}")
    for c in run_configs:
        configs.validate(c)
    check_same_but_seed(run_configs)
    config = run_configs[0]
    dp = parallel.make_data_parallel(config.train.num_devices,
                                     config.train.cross_device_reduce)
    configs.check_against_devices(config, dp.num_devices)
    vmapped = len(run_configs) > 1
    if vmapped and dp.num_devices > 1:  # the batch is already split over the devices
        return [train_seeds([c], [w])[0] for c, w in zip(run_configs, workdirs)]
    workdirs = [prepare_workdir(w) for w in workdirs]
    dataset = data.load(config)
    configs.check_against_data(config, len(dataset.train_images))

    schedule = Schedule.from_config(config, len(dataset.train_images))
    run_keys = [RunKeys.from_seed(c.seed) for c in run_configs]
    model = build_training_model(config, dp)
    states = [create_train_state(config, model, k.init, schedule.total_steps)
              for k in run_keys]
    beta_schedule = losses.make_beta_schedule(config.loss, schedule.steps_per_epoch,
                                              schedule.total_steps)
    dynamic_binarization = config.data.binarize == "dynamic"
    # The model is scored on one fixed binarisation of the test set (as published tables
    # are); image-quality metrics and figures keep the grey-level originals.
    test_inputs = binarize.binarize_fixed(dataset.test_images) if dynamic_binarization \
        else dataset.test_images
    train_step = make_train_step(model, config.loss, beta_schedule,
                                 skip_nonfinite=config.train.on_nonfinite == "skip",
                                 binarize_inputs=dynamic_binarization)
    train_chunk = make_train_chunk(train_step, config.train.batch_size,
                                   schedule.steps_per_epoch, dp, vmap_seeds=vmapped)
    eval_step = jax.jit(make_eval_step(model, config.loss), static_argnames="shard")
    per_dispatch = config.train.steps_per_dispatch or \
        default_steps_per_dispatch(schedule.steps_per_epoch)

    ckpts: list[checkpoint.Checkpointer | None] = []
    writers: list[MetricsWriter] = []
    try:
        for c, w in zip(run_configs, workdirs):
            ckpts.append(checkpoint.Checkpointer(w, c) if config.checkpoint.enabled else None)
        restored = [None if ckpt is None else
                    ckpt.restore_latest(checkpoint.state_tree(state, zero_metrics()))
                    for ckpt, state in zip(ckpts, states)]
        for r, w in zip(restored, workdirs):
            if r is not None and r[0] > schedule.total_steps:
                raise checkpoint.CheckpointError(
                    f"the checkpoint in {w} is at step {r[0]}, past the "
                    f"{schedule.total_steps} steps this config trains: the run was trained "
                    "longer. Set train.num_epochs (or train.num_steps) to its length or "
                    "more, or use a new --workdir.")
        if len({None if r is None else r[0] for r in restored}) > 1:
            logging.info("the seeds' checkpoints are at different steps; training them one "
                         "after another")
            for ckpt in filter(None, ckpts):
                ckpt.close()
            ckpts = []
            return [train_seeds([c], [w])[0] for c, w in zip(run_configs, workdirs)]
        run_sums = [zero_metrics() for _ in run_configs]
        log_from = [None if r is None else schedule.log_resume_step(r[0]) for r in restored]
        sums_from = 0  # the step the restored epoch sums count from, if after its start
        for i, r in enumerate(restored):
            if r is not None:
                states[i] = serialization.from_state_dict(states[i], r[1]["train_state"])
                run_sums[i] = {k: jnp.asarray(v) for k, v in r[1]["epoch_sums"].items()}
                logging.info("resuming %s from the checkpoint at step %d in %s",
                             config.name, r[0], workdirs[i])
                if log_from[i] < r[0] and not any(float(v) for v in run_sums[i].values()):
                    # An earlier fvae ended this run mid-epoch with its sums reset: keep
                    # that partial epoch's lines, count the rest's means from here.
                    log_from[i] = sums_from = r[0]
                elif log_from[i] < r[0] and ckpts[i] is not None:
                    ckpts[i].set_aside_best_between(log_from[i], r[0])  # line dropped
        primary = jax.process_index() == 0  # of a multi-host job, one process writes files
        for c, w, resume_log in zip(run_configs, workdirs, log_from):
            if primary:
                write_config(c, w)
            writers.append(MetricsWriter(w, resume_step=resume_log,
                                         tensorboard=config.train.tensorboard,
                                         primary=primary))

        state = dp.replicate(stack_seeds(states, vmapped))
        sums = dp.replicate(stack_seeds(run_sums, vmapped))  # saved with the state
        del states, restored, run_sums  # no second copy of every seed's state
        train_images = dp.replicate(dataset.train_images)
        train_key = dp.replicate(stack_seeds([k.train for k in run_keys], vmapped))
        start_time = time.time()
        step = int(seed_slice(state, 0, vmapped).step)
        logging.info("training %s%s for %d steps (%d epochs of %d steps) in %s", config.name,
                     f" for seeds {[c.seed for c in run_configs]} together" if vmapped else "",
                     schedule.total_steps, schedule.num_epochs, schedule.steps_per_epoch,
                     ", ".join(map(str, workdirs)))
        every, ckpt_enabled = config.checkpoint.every_steps, config.checkpoint.enabled
        perm_epoch, perm = None, None
        timer_step, timer_t0 = step, time.time()
        with _progress(schedule.total_steps, step, config.train.progress_bar) as bar, \
                StopRequest() as stop:
            while step < schedule.total_steps:
                epoch = step // schedule.steps_per_epoch
                epoch_start = epoch * schedule.steps_per_epoch
                epoch_end = min(epoch_start + schedule.steps_per_epoch, schedule.total_steps)
                if perm_epoch != epoch:
                    perm_epoch, perm = epoch, dp.replicate(stack_seeds(
                        [epoch_permutation(k.data, epoch, len(dataset.train_images))
                         for k in run_keys], vmapped))
                counted_from = max(epoch_start, sums_from)  # the steps the sums hold
                n = chunk_length(step, epoch_start, epoch_end, per_dispatch)
                state, chunk = train_chunk(state, train_images, perm, train_key, num_steps=n)
                sums = jax.tree.map(jnp.add, sums, chunk)
                previous, step = step, step + n
                bar.update(n)
                save_now = ckpt_enabled and (
                    (every and step // every > previous // every)
                    or step == schedule.total_steps or (not every and step == epoch_end))
                if save_now or step == epoch_end or stop.signum is not None or \
                        step // config.train.log_every_steps > \
                        previous // config.train.log_every_steps:
                    running = [mean_metrics(seed_slice(sums, i, vmapped), step - counted_from)
                               for i in range(len(run_configs))]
                    for c, metrics in zip(run_configs, running):
                        if metrics["skipped"] < step - counted_from:  # (all skipped: no means)
                            check_finite(metrics, step, seed=c.seed if vmapped else None)
                    bar.set_postfix(loss=f"{np.mean([m['loss'] for m in running]):.2f}",
                                    epoch=epoch + 1)
                if step == epoch_end:
                    jax.block_until_ready(state)
                    images_per_sec = ((step - timer_step) * config.train.batch_size
                                      / (time.time() - timer_t0))
                    for i, c in enumerate(run_configs):
                        _end_epoch(c, model, seed_slice(state, i, vmapped),
                                   seed_slice(sums, i, vmapped), step, epoch, counted_from,
                                   images_per_sec, start_time, beta_schedule, eval_step,
                                   dataset, test_inputs, run_keys[i], writers[i], ckpts[i],
                                   bar, dp, label=f"seed {c.seed}, " if vmapped else "")
                    if step - epoch_start == schedule.steps_per_epoch:  # else the run ends
                        # mid-epoch: its sums are saved as they are, for a longer run to
                        # finish the epoch from (see Schedule.log_resume_step)
                        sums = dp.replicate(stack_seeds([zero_metrics() for _ in run_configs],
                                                        vmapped))
                    timer_step, timer_t0 = step, time.time()
                # A stop request (possibly arriving during the epoch's evaluation) always
                # saves, so the message below never promises a checkpoint that is not there.
                if save_now or (ckpt_enabled and stop.signum is not None):
                    for i, c in enumerate(run_configs):  # never save non-finite parameters
                        check_finite({}, step, seed_slice(state, i, vmapped).params,
                                     seed=c.seed if vmapped else None)
                    for i, ckpt in enumerate(ckpts):  # (enabled: every ckpt exists)
                        ckpt.save(step, checkpoint.state_tree(seed_slice(state, i, vmapped),
                                                              seed_slice(sums, i, vmapped)))
                if stop.signum is not None:
                    for ckpt in filter(None, ckpts):
                        ckpt.wait()
                    raise TrainingInterrupted(stop.signum, step, ckpt_enabled)
        finals = [seed_slice(state, i, vmapped) for i in range(len(run_configs))]
        for c, final, keys, w, writer in zip(run_configs, finals, run_keys, workdirs, writers):
            if primary and c.train.num_figure_images:  # on this process's devices only
                save_figures(model, parallel.host_local(final.params), c, dataset, keys, w,
                             writer, step)
    except BaseException:  # however training ends, in-flight saves complete, files close
        close_all(ckpts, writers, raise_first=False)  # and the first error is the one seen
        raise
    close_all(ckpts, writers)
    return finals


def close_all(ckpts, writers, raise_first: bool = True) -> None:
    """Waits for and closes every checkpointer and writer, even when one of them fails;
    then raises the first failure (if `raise_first`) or logs them."""
    errors = []
    for close in [f for ckpt in filter(None, ckpts) for f in (ckpt.wait, ckpt.close)] + \
            [writer.close for writer in writers]:
        try:
            close()
        except Exception as e:  # noqa: BLE001 - the rest must still close
            errors.append(e)
    if errors and raise_first:
        raise errors[0]
    for e in errors:
        logging.error("while closing the run's files: %s", e)


def _end_epoch(config, model, state, sums, step, epoch, counted_from, images_per_sec,
               start_time, beta_schedule, eval_step, dataset, test_inputs, keys, writer,
               ckpt, bar, dp, label: str = "") -> None:
    """Writes the epoch's train and test lines and keeps the best checkpoint."""
    train_metrics = mean_metrics(sums, step - counted_from)
    common = {"epoch": epoch + 1, "step": step, "wall_time": time.time() - start_time}
    writer.write({"split": "train", **common, **train_metrics,
                  "images_per_sec": images_per_sec})
    beta_now = float(beta_schedule(step - 1))
    eval_start = time.time()
    test_metrics = evaluate_losses(eval_step, state.params, test_inputs,
                            config.train.eval_batch_size, keys.eval, beta_now, dp)
    if config.train.epoch_metrics_images:  # reconstruction quality and active units
        test_metrics.update(evaluate.cheap_metrics(
            model, state.params, config, dataset.test_images[:config.train.epoch_metrics_images]))
    writer.write({"split": "test", **common, **test_metrics, "beta": beta_now,
                  "test_seconds": time.time() - eval_start})
    if ckpt is not None:
        ckpt.save_best(step, checkpoint.state_tree(state, dp.replicate(zero_metrics())),
                       test_metrics["elbo"])
    bar.write(f"{label}epoch {epoch + 1}: train loss {train_metrics['loss']:.2f}, test loss "
              f"{test_metrics['loss']:.2f}, test elbo {test_metrics['elbo']:.2f} nats, "
              f"step {step}, {images_per_sec:.0f} img/s")
