"""One run's training loop: `train_and_evaluate(config, workdir)`.

Read `_loop` from top to bottom: each pass runs one compiled chunk of steps
(fvae.steps), then does the host work that falls due at its end: progress, the
epoch's log lines and best checkpoint, the periodic checkpoint, a stop request.
Keys and data order are functions of the step (fvae.keys), so a run resumed from a
checkpoint continues bit for bit.

Seeds that differ only in `seed` can train together as one vmapped computation
(`train_seeds`): the same loop, with the seeds' arrays stacked on a leading axis
(`Program.seeds` says how they are held; one seed's are held as they are). Each seed
keeps its own workdir, checkpoints and log, exactly as if it had trained alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from flax import serialization

from fvae import (binarize, checkpoint, configs, cpu, data, evaluate, locking, losses,
                  models, parallel, provenance)
from fvae.keys import RunKeys, epoch_permutation
from fvae.steps import (Metrics, Seeds, TrainState, all_finite, create_train_state,
                        default_steps_per_dispatch, evaluate_losses, make_eval_step,
                        make_train_chunk, make_train_step, state_tree, zero_metrics)
from fvae.writer import RunLog, open_run_log


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the parts."""


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT stopped training after a checkpoint was saved."""

    def __init__(self, signum: int, step: int, saved: bool):
        self.signum, self.step, self.saved = signum, step, saved
        how = ("a checkpoint was saved; rerun the same command to resume" if saved else
               "checkpointing is off, so this progress is lost")
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}: {how}.")


class SeedsOutOfStep(Exception):
    """Seeds to be trained together resumed at different steps."""


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How many steps a run has and how they fall into epochs."""
    steps_per_epoch: int
    total_steps: int

    @property
    def num_epochs(self) -> int:
        return -(-self.total_steps // self.steps_per_epoch)

    def epoch_bounds(self, step: int) -> tuple[int, int, int]:
        """(epoch, its first step, the step it ends at) for the epoch holding `step`."""
        epoch = step // self.steps_per_epoch
        start = epoch * self.steps_per_epoch
        return epoch, start, min(start + self.steps_per_epoch, self.total_steps)

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


@dataclasses.dataclass
class Run:
    """One seed's run: its config, key streams and files."""
    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    keys: RunKeys
    label: str = ""  # "seed 3, " in messages when several seeds train together
    ckpt: checkpoint.Checkpointer | None = None
    writer: RunLog | None = None
    kernel_choices: dict[str, str] = dataclasses.field(default_factory=dict)  # as used


@dataclasses.dataclass(frozen=True)
class Program:
    """What the seeds of a run share: data, model, schedules and compiled steps."""
    config: ml_collections.ConfigDict
    dp: parallel.DataParallel
    dataset: data.Dataset
    # What each epoch is scored on, by split (binarised once if dynamic): validation,
    # which selects the checkpoint, and test only for report.epoch_test_metrics.
    eval_inputs: dict[str, np.ndarray]
    schedule: Schedule
    model: models.VAE
    beta_schedule: Callable[[jax.Array], jax.Array]
    train_chunk: Callable
    eval_step: Callable
    per_dispatch: int  # steps per compiled call
    seeds: Seeds  # how the seeds' arrays are held (stacked if several)


@dataclasses.dataclass
class Progress:
    """Where the loop is: the stacked state and epoch sums, the step, the clocks."""
    state: TrainState
    sums: Metrics
    step: int
    start_time: float = dataclasses.field(default_factory=time.time)
    timer_step: int = 0
    timer_start: float = dataclasses.field(default_factory=time.time)

    def images_per_sec(self, batch_size: int) -> float:
        return (self.step - self.timer_step) * batch_size / (time.time() - self.timer_start)

    def restart_timer(self) -> None:
        self.timer_step, self.timer_start = self.step, time.time()


# ---------------------------------------------------------------- entry points
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains the config's model, evaluating on the validation split after every epoch
    (the best checkpoint is the one of the lowest validation ELBO).

    Writes workdir/config.json, workdir/metrics.jsonl (one line per epoch and split),
    checkpoints under workdir/checkpoints/ and workdir/figures/*.png. Resumes from the
    latest checkpoint in workdir if there is one. Returns the final state.
    """
    return train_seeds([config], [workdir])[0]


def train_seeds(run_configs: Sequence[ml_collections.ConfigDict],
                workdirs: Sequence[str | pathlib.Path]) -> list[TrainState]:
    """Trains runs that differ only in `seed` as one vmapped computation.

    Each run writes its own workdir exactly as train_and_evaluate does and resumes from
    its own checkpoints; every seed gets the keys and data order of its own separate
    run, and results equal separate runs within float tolerance (the vmapped
    convolutions sum in another order). Where that cannot be done (several devices, or
    checkpoints at different steps) the runs train one after another.
    """
    check_group(run_configs, workdirs)
    config = run_configs[0]
    dp = parallel.make_data_parallel(config.runtime.num_devices,
                                     config.runtime.cross_device_reduce)
    configs.check_against_devices(config, dp.num_devices)
    if len(run_configs) > 1 and dp.num_devices > 1:  # the batch is already split
        return [train_and_evaluate(c, w) for c, w in zip(run_configs, workdirs)]
    try:
        return _train_together(run_configs, workdirs, dp)
    except SeedsOutOfStep as e:
        logging.info("the seeds' checkpoints are at different steps (%s); training them "
                     "one after another", e)
        return [train_and_evaluate(c, w) for c, w in zip(run_configs, workdirs)]


def check_group(run_configs: Sequence[ml_collections.ConfigDict],
                workdirs: Sequence[str | pathlib.Path]) -> None:
    """Validates the configs; those trained together must differ in `seed` alone."""
    if len(run_configs) != len(workdirs) or not run_configs:
        raise ValueError(f"{len(run_configs)} configs for {len(workdirs)} workdirs")
    if len({pathlib.Path(w).resolve() for w in workdirs}) != len(workdirs):
        raise ValueError(f"runs trained together need one workdir each, got {workdirs}")
    for c in run_configs:
        configs.ensure_valid(c)
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


# ---------------------------------------------------------------- set-up
def training_model(config: ml_collections.ConfigDict, dp: parallel.DataParallel):
    """The config's model, computing with fvae's CPU kernels (runtime.cpu_conv3x3) unless
    XLA partitions the step: its partitioner would gather the whole batch on every
    device for them."""
    return cpu.accelerate(models.build_model(config.model),
                          "xla" if dp.partitioned_by_xla else config.runtime.cpu_conv3x3)


def build_program(config: ml_collections.ConfigDict, dp: parallel.DataParallel,
                  num_seeds: int) -> Program:
    """Loads the data and builds the model and the compiled steps for `num_seeds` seeds."""
    dataset = data.load(config)
    configs.check_against_data(config, len(dataset.train_images))
    schedule = Schedule.from_config(config, len(dataset.train_images))
    model = training_model(config, dp)
    beta_schedule = losses.make_beta_schedule(config.loss, schedule.steps_per_epoch,
                                              schedule.total_steps)
    dynamic = config.data.binarize == "dynamic"
    train_step = make_train_step(model, config.loss, beta_schedule,
                                 skip_nonfinite=config.train.on_nonfinite == "skip",
                                 binarize_inputs=dynamic)
    eval_inputs = {"validation": evaluate.model_inputs(config, dataset.validation_images,
                                                       binarize.VALIDATION_SEED)}
    if config.report.epoch_test_metrics:
        eval_inputs["test"] = evaluate.model_inputs(config, dataset.test_images)
    return Program(
        config, dp, dataset, eval_inputs, schedule, model, beta_schedule,
        make_train_chunk(train_step, config.train.batch_size, schedule.steps_per_epoch, dp,
                         num_seeds),
        make_eval_step(model, config.loss),
        config.runtime.steps_per_dispatch or default_steps_per_dispatch(
            schedule.steps_per_epoch),
        Seeds(num_seeds))


def _train_together(run_configs, workdirs, dp: parallel.DataParallel) -> list[TrainState]:
    """train_seeds on one program, each workdir locked against other processes (by
    process 0 of a multi-host job, whose processes share the workdir)."""
    together = len(run_configs) > 1
    runs = [Run(c, prepare_workdir(w), RunKeys.from_seed(c.seed),
                label=f"seed {c.seed}, " if together else "")
            for c, w in zip(run_configs, workdirs)]
    with contextlib.ExitStack() as locks:
        locking.lock_for_job(locks, [(run.workdir, f"training {run.config.name}")
                                     for run in runs])
        return _train_locked(runs, dp)


def _train_locked(runs: list[Run], dp: parallel.DataParallel) -> list[TrainState]:
    """Restore, loop, figures; files closed however it ends."""
    together = len(runs) > 1
    program = build_program(runs[0].config, dp, len(runs))
    with cpu.recording_kernel_choices() as used:  # the CPU kernels' choices, which the
        for run in runs:  # seeds trained together share
            run.kernel_choices = used
        try:
            for run in runs:
                if run.config.checkpoint.enabled:
                    run.ckpt = checkpoint.Checkpointer(run.workdir, run.config)
            progress = _restore(runs, program)
            _open_logs(runs, program.schedule, progress.step)
            logging.info("training %s%s for %d steps (%d epochs of %d steps) in %s",
                         program.config.name,
                         f" for seeds {[r.config.seed for r in runs]} together" if together
                         else "", program.schedule.total_steps, program.schedule.num_epochs,
                         program.schedule.steps_per_epoch,
                         ", ".join(str(r.workdir) for r in runs))
            _loop(runs, program, progress)
            finals = [program.seeds.slice(progress.state, i) for i in range(len(runs))]
            for run, final in zip(runs, finals):
                if jax.process_index() == 0 and run.config.report.num_figure_images:
                    save_figures(program, run, parallel.host_local(final.params),
                                 progress.step)
            _record_kernel_choices(runs)
        except BaseException as e:  # however training ends, in-flight saves complete,
            close_all(runs, raise_first=False, raising=e)  # files close, and the first
            raise  # error is the one seen
    close_all(runs)
    return finals


def _restore(runs: list[Run], program: Program) -> Progress:
    """Each seed's initial state, or its latest readable checkpoint, stacked."""
    schedule, states, sums, steps = program.schedule, [], [], []
    for run in runs:
        state = create_train_state(run.config, program.model, run.keys.init,
                                   schedule.total_steps)
        restored = run.ckpt and run.ckpt.restore_latest(state_tree(state, zero_metrics()))
        step, run_sums = 0, zero_metrics()
        if restored:
            step, tree = restored
            if step > schedule.total_steps:
                raise checkpoint.CheckpointError(
                    f"the checkpoint in {run.workdir} is at step {step}, past the "
                    f"{schedule.total_steps} steps this config trains: the run was trained "
                    "longer. Set train.num_epochs (or train.num_steps) to its length or "
                    "more, or use a new --workdir.")
            state = serialization.from_state_dict(state, tree["train_state"])
            run_sums = {k: jnp.asarray(v) for k, v in tree["epoch_sums"].items()}
            logging.info("resuming %s from the checkpoint at step %d in %s",
                         run.config.name, step, run.workdir)
        states.append(state)
        sums.append(run_sums)
        steps.append(step)
    if len(set(steps)) > 1:
        raise SeedsOutOfStep(f"steps {steps}")
    if steps[0]:
        _pin_recorded_kernel_choices(runs[0].workdir)
    dp, seeds = program.dp, program.seeds
    return Progress(dp.replicate(seeds.stack(states)), dp.replicate(seeds.stack(sums)),
                    steps[0])


def _open_logs(runs: list[Run], schedule: Schedule, step: int) -> None:
    """Writes config.json and opens each seed's log, trimmed to what a run resumed at
    `step` keeps (see Schedule.log_resume_step); a best checkpoint whose validation line is
    trimmed is set aside."""
    keep_from = schedule.log_resume_step(step) if step else None
    primary = jax.process_index() == 0  # of a multi-host job, one process writes files
    session = {**provenance.record(runs[0].config), "start_step": step} if primary else None
    for run in runs:  # (seeds trained together share the session: configs differ in seed)
        if keep_from is not None and keep_from < step and run.ckpt is not None:
            run.ckpt.set_aside_best_between(keep_from, step)
        if primary:
            write_config(run.config, run.workdir)
            provenance.append(run.workdir, session)
        run.writer = open_run_log(run.workdir, run.config, resume_step=keep_from,
                                  primary=primary)


# ---------------------------------------------------------------- the loop
def _loop(runs: list[Run], program: Program, progress: Progress) -> None:
    config, schedule, dp, seeds = program.config, program.schedule, program.dp, program.seeds
    images = dp.replicate(program.dataset.train_images)
    train_key = dp.replicate(seeds.stack([run.keys.train for run in runs]))
    perm_epoch, perm, in_flight = None, None, None
    progress.start_time = time.time()
    progress.restart_timer()
    with _progress_bar(schedule.total_steps, progress.step, config.report.progress_bar) as bar, \
            StopRequest() as stop:
        while progress.step < schedule.total_steps:
            # ---- one compiled chunk of steps
            epoch, epoch_start, epoch_end = schedule.epoch_bounds(progress.step)
            if perm_epoch != epoch:
                perm_epoch, perm = epoch, dp.replicate(seeds.stack(
                    [epoch_permutation(run.keys.data, epoch, len(images)) for run in runs]))
            previous = progress.step
            n = chunk_length(previous, epoch_start, epoch_end, program.per_dispatch)
            progress.state, chunk = program.train_chunk(progress.state, images, perm,
                                                        train_key, num_steps=n)
            # The host runs at most one chunk ahead of the device (JAX dispatches
            # asynchronously): a signal is then handled within a chunk, not when the
            # queue drains at the epoch's end, and the next chunk is queued meanwhile.
            jax.block_until_ready(in_flight)
            in_flight = chunk
            progress.sums = jax.tree.map(jnp.add, progress.sums, chunk)
            progress.step = step = previous + n
            bar.update(n)
            for run in runs:  # a failed asynchronous save stops the run here
                run.ckpt and run.ckpt.check_saved()

            # ---- host work that falls due at the chunk's end
            save_now = save_due(config, previous, step, epoch_end, schedule.total_steps)
            if save_now or step == epoch_end or stop.signum is not None or \
                    step // config.report.log_every_steps > \
                    previous // config.report.log_every_steps:
                _check_and_show(runs, program, progress, step - epoch_start, bar, epoch)
            if step == epoch_end:
                _end_epoch(runs, program, progress, epoch, bar)
            # A stop request (possibly arriving during the epoch's evaluation) always
            # saves, so the message below never promises a checkpoint that is not there.
            if save_now or (config.checkpoint.enabled and stop.signum is not None):
                _save(runs, program, progress)
            if stop.signum is not None:
                for run in runs:
                    run.ckpt and run.ckpt.wait()
                raise TrainingInterrupted(stop.signum, step, config.checkpoint.enabled)


def save_due(config: ml_collections.ConfigDict, previous: int, step: int, epoch_end: int,
             total_steps: int) -> bool:
    """Whether a chunk from `previous` to `step` ends at a checkpoint: every
    checkpoint.every_steps steps (or each epoch's end if 0), and the run's end."""
    every = config.checkpoint.every_steps
    return config.checkpoint.enabled and (
        (every and step // every > previous // every) or step == total_steps
        or (not every and step == epoch_end))


def chunk_length(step: int, epoch_start: int, epoch_end: int, per_dispatch: int) -> int:
    """Steps in the next compiled call; chunks are aligned to the epoch start so a
    resumed run (which always resumes at a chunk boundary) chunks the same way."""
    return min(per_dispatch - (step - epoch_start) % per_dispatch, epoch_end - step)


def mean_metrics(sums: Metrics, num_steps: int) -> dict[str, float]:
    """Per-step means of summed train metrics, over the steps that were not skipped."""
    sums = {k: float(v) for k, v in sums.items()}
    skipped = sums.pop("skipped")
    counted = num_steps - skipped
    means = {k: (v / counted if counted else float("nan")) for k, v in sums.items()}
    return {**means, "skipped": int(skipped)}


def _check_and_show(runs: list[Run], program: Program, progress: Progress,
                    steps_summed: int, bar, epoch: int) -> None:
    """Stops on a non-finite running mean; shows the mean loss on the progress bar."""
    running = [mean_metrics(program.seeds.slice(progress.sums, i), steps_summed)
               for i in range(len(runs))]
    for run, metrics in zip(runs, running):
        if metrics["skipped"] < steps_summed:  # (all skipped: no means)
            check_finite(metrics, progress.step, seed=run.config.seed if run.label else None,
                         kept=run.ckpt and run.ckpt.latest_step())
    bar.set_postfix(loss=f"{np.mean([m['loss'] for m in running]):.2f}", epoch=epoch + 1)


def _end_epoch(runs: list[Run], program: Program, progress: Progress, epoch: int,
               bar) -> None:
    """Each seed's epoch lines and best checkpoint; a whole epoch's sums start afresh
    (a run that ends mid-epoch saves them as they are, for a longer run to finish the
    epoch from: see Schedule.log_resume_step)."""
    jax.block_until_ready(progress.state)
    images_per_sec = progress.images_per_sec(program.config.train.batch_size)
    steps_summed = progress.step - epoch * program.schedule.steps_per_epoch
    epoch_metrics = [mean_metrics(program.seeds.slice(progress.sums, i), steps_summed)
                     for i in range(len(runs))]
    for i, run in enumerate(runs):
        _log_epoch(run, program, program.seeds.slice(progress.state, i), epoch_metrics[i],
                   progress, epoch, images_per_sec, bar)
    for run, metrics in zip(runs, epoch_metrics):
        check_skipped(run, metrics["skipped"], steps_summed, epoch)
    if steps_summed == program.schedule.steps_per_epoch:
        progress.sums = program.dp.replicate(program.seeds.stack([zero_metrics() for _ in runs]))
    _record_kernel_choices(runs)
    progress.restart_timer()


def _record_kernel_choices(runs: list[Run]) -> None:
    """Adds to each run's provenance which implementation computed each of its CPU
    layers, as measured when its steps were traced (fvae/cpu/dispatch.py); nothing
    where none was dispatched (another backend, runtime.cpu_conv3x3='xla')."""
    if jax.process_index() == 0:
        for run in runs:
            if run.kernel_choices:
                provenance.add_to_latest(run.workdir,
                                         {"kernel_choices": dict(sorted(run.kernel_choices.items()))})


def _pin_recorded_kernel_choices(workdir: pathlib.Path) -> None:
    """A resumed run computes each CPU layer as its last session did (bit for bit, on
    the same machine), whatever the table of measured choices now says."""
    recorded = [s["kernel_choices"] for s in provenance.read(workdir) if s.get("kernel_choices")]
    if recorded:
        cpu.pin_kernel_choices(recorded[-1])


def _log_epoch(run: Run, program: Program, state: TrainState, train_metrics: dict,
               progress: Progress, epoch: int, images_per_sec: float, bar) -> None:
    """Writes one seed's train and validation lines (and test lines, if the config asks)
    and keeps its checkpoint of the lowest validation ELBO. The test set selects nothing."""
    config, step = run.config, progress.step
    common = {"epoch": epoch + 1, "step": step, "wall_time": time.time() - progress.start_time}
    run.writer.write({"split": "train", **common, **train_metrics,
                      "images_per_sec": images_per_sec})
    beta_now = float(program.beta_schedule(step - 1))
    params = parallel.host_local(state.params)
    scored = {split: _score(run, program, params, beta_now, split)
              for split in program.eval_inputs}
    for split, metrics in scored.items():
        run.writer.write({"split": split, **common, **metrics, "beta": beta_now})
    validation = scored["validation"]
    if run.ckpt is not None:
        run.ckpt.save_best(step, state_tree(state, program.dp.replicate(zero_metrics())),
                           validation["elbo"])
    bar.write(f"{run.label}epoch {epoch + 1}: train loss {train_metrics['loss']:.2f}, "
              f"validation loss {validation['loss']:.2f}, validation elbo "
              f"{validation['elbo']:.2f} nats, step {step}, {images_per_sec:.0f} img/s")


def _score(run: Run, program: Program, params, beta: float, split: str) -> dict[str, float]:
    """One split's epoch metrics: the losses of every image, reconstruction quality and
    active units on the first report.epoch_metrics_images, and the seconds it took."""
    config, start = run.config, time.time()
    inputs, n = program.eval_inputs[split], config.report.epoch_metrics_images
    metrics = evaluate_losses(program.eval_step, params, inputs,
                              config.runtime.eval_batch_size, run.keys.eval, beta,
                              parallel.local_devices(config.runtime.num_devices))
    if n:
        images = getattr(program.dataset, f"{split}_images")[:n]
        metrics.update(evaluate.epoch_image_metrics(program.model, params, config, images,
                                                    inputs[:n]))
    return {**metrics, "eval_seconds": time.time() - start}


def _save(runs: list[Run], program: Program, progress: Progress) -> None:
    """Each seed's latest checkpoint; never one of non-finite parameters."""
    seeds = [program.seeds.slice((progress.state, progress.sums), i) for i in range(len(runs))]
    for run, (state, _) in zip(runs, seeds):
        check_finite({}, progress.step, state.params,
                     seed=run.config.seed if run.label else None,
                     kept=run.ckpt and run.ckpt.latest_step())
    for run, (state, sums) in zip(runs, seeds):
        run.ckpt.save(progress.step, state_tree(state, sums))


# ---------------------------------------------------------------- helpers
# What to do about non-finite steps. train.on_nonfinite may change on resume (the steps
# that were finite compute the same either way); the optimizer's settings may not.
NONFINITE_ADVICE = ("Resume this workdir with --config.train.on_nonfinite=skip to skip "
                    "such steps, or train afresh in a new --workdir with a lower "
                    "optim.learning_rate or an optim.grad_clip_norm")


def check_finite(metrics: dict[str, float], step: int, params=None,
                 seed: int | None = None, kept: int | None = None) -> None:
    """Raises NonFiniteLossError naming the step (and seed), every loss part and the
    checkpoint that is kept (`kept`: the latest saved step, None if none)."""
    finite_params = params is None or bool(all_finite(params))
    if not finite_params or not all(math.isfinite(v) for v in metrics.values()):
        parts = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
        raise NonFiniteLossError(
            f"non-finite loss by step {step}{'' if seed is None else f' of seed {seed}'}: "
            f"{parts}{'' if finite_params else ' (and non-finite parameters)'}. "
            f"{NONFINITE_ADVICE}. "
            + (f"The checkpoint at step {kept} is kept." if kept else
               "No checkpoint had been saved yet."))


def check_skipped(run: "Run", skipped: int, steps_summed: int, epoch: int) -> None:
    """Warns of skipped steps; raises NonFiniteLossError past train.max_skipped_fraction."""
    if not skipped:
        return
    fraction, limit = skipped / steps_summed, run.config.train.max_skipped_fraction
    message = (f"{run.label}epoch {epoch + 1}: {skipped} of {steps_summed} steps "
               f"({fraction:.0%}) had a non-finite loss and were skipped")
    if fraction > limit:
        raise NonFiniteLossError(
            f"{message}, more than train.max_skipped_fraction={limit}: the run is not "
            f"learning. {NONFINITE_ADVICE}.")
    logging.warning("%s", message)


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


def close_all(runs: list[Run], raise_first: bool = True,
              raising: BaseException | None = None) -> None:
    """Waits for and closes every checkpointer and writer, even when one of them fails;
    then raises the first failure (if `raise_first`) or logs them, but for one that says
    what `raising` (the error that ends the run) says already."""
    errors = []
    closers = [f for run in runs if run.ckpt is not None for f in (run.ckpt.wait, run.ckpt.close)]
    closers += [run.writer.close for run in runs if run.writer is not None]
    for close in closers:
        try:
            close()
        except Exception as e:  # noqa: BLE001 - the rest must still close
            errors.append(e)
    if errors and raise_first:
        raise errors[0]
    for e in errors:
        if raising is None or str(e) != str(raising):
            logging.error("while closing the run's files: %s", e)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                dynamic_ncols=True, leave=True)


def write_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json(indent=2, sort_keys=True) + "\n")


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


def save_figures(program: Program, run: Run, params, step: int) -> None:
    """Every per-run figure (fvae.plots) of the final parameters, the reconstructions and
    samples also as TensorBoard images."""
    from fvae import plots  # here: importing fvae.train must not set matplotlib's backend
    config, figures = run.config, run.workdir / "figures"
    plots.write_figures(program.model, params, config, program.dataset, figures,
                        run.keys.figures, num_images=config.report.num_figure_images,
                        add_images=lambda tag, images, ncols=8: run.writer.add_images(
                            tag, images, step, ncols=ncols))
    plots.loss_curves(run.workdir, figures / "loss_curves.png",
                      title=f"{config.name}: training curves")
