"""What is done to a trained run's workdir: read its checkpoint back as a model, score
it into workdir/eval.json, draw its figures into workdir/figures/.

    runs.load_checkpoint(workdir, "best")   -> LoadedRun(config, model, params, step)
    runs.evaluate_run(workdir)              -> eval.json (launch.py --mode eval)
    runs.write_run_figures(workdir)         -> figures/*.png (launch.py --mode plot)
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import time
from typing import Any, NamedTuple

import jax
import ml_collections

from fvae import (checkpoint, classifier, configs, cpu, data, evaluate, locking, models,
                  provenance)
from fvae.keys import RunKeys
from fvae.steps import abstract_state_tree
from fvae.writer import jsonable, read_metrics


# A user's mistake, which the commands (fvae-train, fvae-sweep) report as one line.
USER_ERRORS = (configs.ConfigError, checkpoint.CheckpointError, data.DataError,
               classifier.ClassifierError, locking.WorkdirBusy)

SELECTION_RULE = "the epoch end of the lowest validation ELBO (data.validation_size images)"


class LoadedRun(NamedTuple):
    """A trained run's checkpoint, read back: what it is, its parameters, its step, and
    (for the best checkpoint) the validation ELBO that selected it."""
    config: ml_collections.ConfigDict
    model: Any
    params: Any
    step: int
    validation_elbo: float | None = None


def load_checkpoint(workdir: str | os.PathLike, which: str | int = "latest") -> LoadedRun:
    """The checkpoint `which` names ('latest', 'best' or a step), as a model to apply.
    The model computes with the run's own convolutions (fvae's CPU kernels unless it
    chose XLA's): the IWAE bound decodes thousands of draws per image."""
    built = {}

    def target_for(meta: dict[str, Any]) -> dict:
        config = configs.from_dict(meta["config"])
        model = cpu.accelerate(models.build_model(config.model), config.runtime.cpu_conv3x3)
        built.update(config=config, model=model)
        return abstract_state_tree(config, model)

    meta, tree, step = checkpoint.read(workdir, which, target_for)
    params = jax.tree.map(jax.numpy.asarray, tree["train_state"]["params"])
    return LoadedRun(built["config"], built["model"], params, step,
                     meta.get("validation_elbo"))


def selection(run: LoadedRun, which: str | int) -> dict[str, Any]:
    """How the evaluated checkpoint was chosen, for eval.json: never on the test set."""
    rule = SELECTION_RULE if run.validation_elbo is not None else (
        "unknown: the best checkpoint records no validation ELBO")
    return {"rule": rule if which == "best" else f"checkpoint {which!r}, not selected",
            "checkpoint": which, "step": run.step, "validation_elbo": run.validation_elbo,
            "validation_size": run.config.data.validation_size}


def evaluate_run(workdir: str | os.PathLike, which: str | int = "best",
                 config: ml_collections.ConfigDict | None = None,
                 progress: bool = True) -> dict:
    """Evaluates a run's checkpoint (`which`: 'best', 'latest' or a step) on the test
    split and writes workdir/eval.json; returns the same dict.

    `config` (optional, e.g. the one launch.py was given) supplies the eval block and
    where the data are; its model, loss and data protocol must be those the
    checkpoint was trained with. Without it, the run's own config and the default
    eval block are used.
    """
    workdir = pathlib.Path(workdir)
    path = workdir / "eval.json"
    check_writable(path)  # before minutes (or hours, at K = 5000) of work
    with contextlib.ExitStack() as lock:
        locking.lock_for_job(lock, [(workdir, "evaluating")])
        results, saved = _evaluate(workdir, which, config, progress)
        write_results(path, results)  # the numbers first: a failed figure loses none
        from fvae import plots  # here: importing fvae.runs must not set matplotlib's backend
        plots.iwae_vs_k(results["iwae_by_k"], workdir / "figures" / "iwae_vs_k.png",
                        title=f"{saved.name}: IWAE bound against K (step "
                              f"{results['checkpoint_step']})")
    return results


def _evaluate(workdir: pathlib.Path, which: str | int,
              config: ml_collections.ConfigDict | None, progress: bool):
    """(eval.json's dict, the run's own config)."""
    start = time.time()
    run = load_checkpoint(workdir, which)
    saved, model, params, step = run[:4]
    if config is None:
        config = saved
    else:
        checkpoint.check_config(checkpoint.config_to_dict(saved), config, workdir,
                                only=configs.MODEL_PREFIXES)
    results = evaluate.full_evaluation(model, params, config, data.load(config), progress)
    results["eval_seconds"] = time.time() - start
    results["eval_settings"] = configs.flatten(config.eval)  # what the numbers depend on
    results["checkpoint_step"] = step
    results["selection"] = selection(run, which)
    results["provenance"] = provenance.record(config)
    return results, saved


def check_writable(path: pathlib.Path) -> None:
    """Raises CheckpointError unless a file can be written beside `path`."""
    if not path.parent.is_dir():
        raise checkpoint.CheckpointError(f"there is no workdir {path.parent}: give the "
                                         "--workdir of a trained run.")
    probe = path.with_name(f".{path.name}.write_test.{os.getpid()}")
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise checkpoint.CheckpointError(
            f"cannot write {path} ({e.strerror or e}); nothing was evaluated. Make "
            f"{path.parent} writable, or copy the run to a writable directory and "
            "evaluate it there.") from e


def write_results(path: pathlib.Path, results: dict) -> None:
    """Writes eval.json atomically; if that fails (a disk filled meanwhile), prints the
    results to stdout so that they are not lost, then raises CheckpointError."""
    text = json.dumps(jsonable(results), indent=2, sort_keys=True) + "\n"
    tmp = path.with_suffix(".json.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        print(text, flush=True)
        raise checkpoint.CheckpointError(
            f"could not write {path} ({e.strerror or e}); the results are printed above "
            "in full. Free space or make the directory writable, and save them from "
            "there.") from e


def write_run_figures(workdir: str | os.PathLike, which: str | int = "best",
                      num_images: int = 16, max_points: int = 5000,
                      data_dir: str | os.PathLike | None = None,
                      **figure_options) -> list[pathlib.Path]:
    """All figures of a trained run into workdir/figures/, from its checkpoint `which`
    ('best', 'latest' or a step) and its config; `data_dir` overrides config.data.dir
    when the data has moved. Loss curves are drawn when metrics.jsonl has epochs."""
    from fvae import plots  # here: importing fvae.runs must not set matplotlib's backend
    workdir = pathlib.Path(workdir)
    config, model, params = load_checkpoint(workdir, which)[:3]
    if data_dir is not None:
        config.data.dir = str(data_dir)
    dataset = data.load(config)
    key = RunKeys.from_seed(config.seed).figures
    paths = plots.write_figures(model, params, config, dataset, workdir / "figures", key,
                                num_images=num_images, max_points=max_points,
                                **figure_options)
    if any(r.get("split") != "train" for r in read_metrics(workdir)):
        paths.append(plots.loss_curves(workdir, workdir / "figures" / "loss_curves.png",
                                       title=f"{config.name}: training curves"))
    return paths
