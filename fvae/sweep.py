"""Ablations in one command: a grid of runs with seeds, evaluated and tabulated.

    fvae-sweep --config ablation:quick --sweep_dir runs/ablation
    fvae-sweep --config study:cpu --sweep_dir runs/study --estimate_only
    python -m fvae.sweep --config experiments/study.py:cpu --sweep_dir runs/study \\
        --config.overrides.train.num_epochs=20

--config is a sweep config file, or a packaged one's name (ablation, study) and preset.

A sweep config names a base experiment, the axes to vary and the seeds. Every point
of the grid and every seed gets its own workdir (sweep_dir/<point>/seed<k>), trained
with fvae.train and evaluated with fvae.evaluate; rerunning the command skips finished
runs and resumes interrupted ones from their checkpoints. A point's seeds train together
as one vmapped computation where that is faster (`sweep.vmap_seeds`; by default on
accelerators, not on CPU). The results go to
sweep_dir/results.{md,csv} (mean and standard deviation over seeds) and
sweep_dir/figures/.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import pathlib
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from fvae import configs, logs

# Axis name -> value -> config overrides. Values are what a sweep config lists.
_SUM = {"loss.reduction": "sum", "model.decoder_scale": "none"}
LIKELIHOODS = {
    "bce": {**_SUM, "loss.likelihood": "bce"},
    "mse-sum": {**_SUM, "loss.likelihood": "mse"},
    "mse-mean": {**_SUM, "loss.likelihood": "mse", "loss.reduction": "mean"},
    # The principled versions (fvae.losses): proper likelihoods with a bound to compare.
    "cb": {**_SUM, "loss.likelihood": "continuous_bernoulli"},
    "sigma-optimal": {**_SUM, "loss.likelihood": "gaussian",
                      "loss.gaussian_variance": "optimal"},
    "sigma-learned": {**_SUM, "loss.likelihood": "gaussian", "loss.gaussian_variance": "learned",
                      "model.decoder_scale": "shared"},
    "dlogistic": {**_SUM, "loss.likelihood": "discretized_logistic",
                  "model.decoder_scale": "per_pixel"},
}


def _likelihood(value: str, sweep) -> dict[str, Any]:
    if value not in LIKELIHOODS:
        raise configs.ConfigError(f"sweep likelihood {value!r} is unknown: expected one of "
                                  f"{', '.join(LIKELIHOODS)}")
    return LIKELIHOODS[value]


def _warmup(value: str, sweep) -> dict[str, Any]:
    if value == "on":
        return {"loss.beta_schedule": "linear", "loss.beta_start": 0.0,
                "loss.warmup_epochs": float(sweep.warmup_epochs)}
    if value == "off":
        return {"loss.beta_schedule": "constant"}
    raise configs.ConfigError(f"sweep warmup {value!r} is invalid: expected 'on' or 'off'")


def _experiment(value: str, sweep) -> dict[str, Any]:
    experiment_file(value, sweep)  # (named before any work if it does not exist)
    return configs.flatten((sweep.get("overrides_by_experiment") or {}).get(value, {}))


AXES: dict[str, Callable[[Any, Any], dict[str, Any]]] = {
    # an experiment file of the sweep's experiments_dir, by name: the point's base
    "experiment": _experiment,
    "likelihood": _likelihood,
    "beta": lambda v, sweep: {"loss.beta": float(v)},
    "latent": lambda v, sweep: {"model.latent_dim": int(v)},
    "warmup": _warmup,
}

# What the results table reports, from each run's eval.json (lower or higher is better).
METRICS = ("elbo", "iwae_nll", "kl", "recon_mse", "ssim", "sharpness", "fd_samples",
           "fd_recons", "active_units", "probe_accuracy")


@dataclasses.dataclass(frozen=True)
class Point:
    """One cell of the grid: its axis values and the config overrides they imply."""
    values: tuple[tuple[str, Any], ...]
    overrides: dict[str, Any]

    @property
    def name(self) -> str:
        return ",".join(f"{axis}={value}" for axis, value in self.values)


def grid(sweep: ml_collections.ConfigDict) -> list[Point]:
    """Every combination of the sweep's axes (in alphabetical order, as ConfigDict keeps
    them), each axis's values in the order the config lists them."""
    unknown = sorted(set(sweep.axes) - set(AXES))
    if unknown:
        raise configs.ConfigError(f"unknown sweep axes {unknown}: expected some of "
                                  f"{', '.join(AXES)}")
    names = list(sweep.axes.keys())
    points = []
    for combo in itertools.product(*(sweep.axes[n] for n in names)):
        overrides = {}
        for name, value in zip(names, combo):
            overrides.update(AXES[name](value, sweep))
        points.append(Point(tuple(zip(names, combo)), overrides))
    return points


def experiment_file(name: str, sweep: ml_collections.ConfigDict) -> pathlib.Path:
    """experiments_dir/<name>.py (the `experiment` axis's values name files there)."""
    path = pathlib.Path(sweep.get("experiments_dir", "experiments")) / f"{name}.py"
    if path.exists():
        return path
    try:
        return configs.experiment_path(name)  # a packaged one (fvae installed)
    except configs.ConfigError:
        raise configs.ConfigError(
            f"sweep experiment {name!r}: {path} does not exist, nor does a packaged "
            f"experiment of that name ({', '.join(configs.packaged_experiments())}). Name "
            "a file of sweep.experiments_dir, without '.py'.") from None


def point_base(sweep: ml_collections.ConfigDict, point: Point) -> pathlib.Path:
    """The point's experiment file: its `experiment` axis value, else sweep.base."""
    values = dict(point.values)
    if "experiment" in values:
        return experiment_file(values["experiment"], sweep)
    try:
        return configs.experiment_path(sweep.base)
    except configs.ConfigError:
        raise configs.ConfigError(
            f"sweep.base={sweep.base!r} does not exist: give a path to an experiment file, "
            "relative to where the sweep is run, or a packaged experiment's name.") from None


def point_config(sweep: ml_collections.ConfigDict, point: Point, seed: int
                 ) -> ml_collections.ConfigDict:
    """The full, validated config of one run: base experiment, sweep overrides, point."""
    base = point_base(sweep, point)
    config = configs.load_config_file(base)
    overrides = {**configs.flatten(sweep.overrides), **point.overrides}
    configs.check_keys(overrides)  # a typo or a moved key, named before any work
    for key, value in overrides.items():
        configs.set_key(config, key, value)
    config.seed = int(seed)
    rest = ",".join(f"{a}={v}" for a, v in point.values if a != "experiment")
    config.name = base.stem + (f"[{rest}]" if rest else "")
    return configs.validate(config)


def vmap_seeds(sweep: ml_collections.ConfigDict) -> bool:
    """Whether a point's seeds train as one vmapped computation (train.train_seeds).

    'auto' does so on accelerators only: XLA:CPU runs the vmapped (grouped)
    convolutions so slowly that 2 seeds together took 8.5x as long per step as one
    seed alone (4.3x longer than two separate runs) on a 2-core CPU."""
    value = sweep.get("vmap_seeds", "auto")
    if value == "auto":
        import jax
        return jax.default_backend() != "cpu"
    if value not in ("always", "never"):
        raise configs.ConfigError(f"sweep.vmap_seeds={value!r} is invalid: expected 'auto', "
                                  "'always' or 'never'")
    return value == "always"


def run_dir(sweep_dir: pathlib.Path, point: Point, seed: int) -> pathlib.Path:
    return sweep_dir / point.name.replace("=", "-") / f"seed{seed}"


def evaluated(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> bool:
    """Whether the run was trained with the config (its length included) and has an
    eval.json made with the config's eval settings. Otherwise it goes back to training:
    a run whose length grew resumes, one trained otherwise stops with the differences;
    an evaluation made with other settings (the sweep's IWAE settings changed), or of a
    checkpoint not chosen on validation (an earlier fvae's), is not counted.
    """
    from fvae import checkpoint
    path, trained_with = workdir / "eval.json", workdir / "config.json"
    if not (path.exists() and trained_with.exists()):
        return False
    try:
        evaluation = json.loads(path.read_text())
        differences = checkpoint.config_differences(json.loads(trained_with.read_text()),
                                                    config, lengths_resumable=False)
    except (json.JSONDecodeError, configs.ConfigError):  # (training will say what is wrong)
        return False
    selected = (evaluation.get("selection") or {}).get("validation_elbo") is not None
    return selected and not differences and \
        evaluation.get("eval_settings") == configs.flatten(config.eval)


def set_aside_shorter_evaluation(workdir: pathlib.Path, config: ml_collections.ConfigDict
                                 ) -> None:
    """Renames eval.json to eval.shorter_run.json when the run is about to be trained on
    (its config differs from `config` in length only), so that, should that training be
    interrupted, the shorter run's evaluation is not taken for the longer run's."""
    from fvae import checkpoint
    path = workdir / "eval.json"
    try:
        saved = json.loads((workdir / "config.json").read_text())
        longer = not checkpoint.config_differences(saved, config) and \
            checkpoint.config_differences(saved, config, lengths_resumable=False)
    except (OSError, json.JSONDecodeError, configs.ConfigError):
        return
    if longer and path.exists():
        path.replace(workdir / "eval.shorter_run.json")


def run_configs(sweep: ml_collections.ConfigDict, data_dir: str | None = None,
                progress: bool | None = None) -> list[list[ml_collections.ConfigDict]]:
    """Every run's config, by point and seed (data_dir overrides data.dir, and progress,
    if given, report.progress_bar)."""
    seeds = list(sweep.seeds)
    if len(set(seeds)) != len(seeds):
        raise configs.ConfigError(f"sweep.seeds={tuple(seeds)} repeats a seed: list each once")
    by_point = [[point_config(sweep, p, s) for s in seeds] for p in grid(sweep)]
    for config in itertools.chain(*by_point):
        config.data.dir = data_dir or config.data.dir
        if progress is not None:
            config.report.progress_bar = progress
    return by_point


def left_to_run(sweep: ml_collections.ConfigDict, sweep_dir: pathlib.Path,
                configs_by_point) -> list[ml_collections.ConfigDict]:
    """The runs' configs not yet evaluated with the sweep's settings."""
    return [c for p, cs in zip(grid(sweep), configs_by_point) for c in cs
            if not evaluated(run_dir(sweep_dir, p, c.seed), c)]


def run_sweep(sweep: ml_collections.ConfigDict, sweep_dir: str | pathlib.Path,
              data_dir: str | None = None, progress: bool | None = None,
              estimate: bool = True
              ) -> list[dict[str, Any]]:
    """Trains and evaluates every (point, seed) not yet evaluated with the sweep's eval
    settings (training resumes or, if finished, returns at once); writes the results.
    First, with `estimate`, it logs the measured cost of what is left (write_estimate)."""
    from fvae import runs, train

    sweep_dir = pathlib.Path(sweep_dir)
    points = grid(sweep)
    seeds = list(sweep.seeds)
    together = vmap_seeds(sweep)  # (checked before anything is written)
    configs_by_point = run_configs(sweep, data_dir, progress)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.json").write_text(sweep.to_json(indent=2, sort_keys=True) + "\n")
    left = left_to_run(sweep, sweep_dir, configs_by_point)
    if left and estimate:
        write_estimate(sweep_dir, left)
    for i, (point, point_configs) in enumerate(zip(points, configs_by_point)):
        todo = [(c, run_dir(sweep_dir, point, c.seed)) for c in point_configs]
        todo = [(c, w) for c, w in todo if not evaluated(w, c)]
        logging.info("[%d/%d] %s: %d of %d seeds done", i + 1, len(points), point.name,
                     len(seeds) - len(todo), len(seeds))
        if not todo:
            continue
        for config, workdir in todo:
            set_aside_shorter_evaluation(workdir, config)
        logging.info("training seeds %s", [c.seed for c, _ in todo])
        if together and len(todo) > 1:
            train.train_seeds([c for c, _ in todo], [w for _, w in todo])
        else:
            for config, workdir in todo:
                train.train_and_evaluate(config, str(workdir))
        for config, workdir in todo:
            runs.evaluate_run(workdir, "best", config=config,
                              progress=config.report.progress_bar)
    rows = summarize(sweep_dir, points, sweep.seeds)
    write_results(sweep_dir, rows)
    write_sweep_figures(sweep_dir, points, sweep.seeds)
    return rows


# Fashion-MNIST's images; an estimate assumes them (data.limit_* make them fewer).
NUM_TRAIN, NUM_TEST = 60_000, 10_000
EVAL_COST = 1 / 3  # a forward pass of an image, in training steps' time (no backward)


def estimate_seconds(run_configs: Sequence[ml_collections.ConfigDict]) -> dict[str, Any]:
    """The sweep's cost on this machine, before it trains: every run's training images,
    validation passes and IWAE draws, at the training images/s and IWAE draws/s measured
    here for each distinct model (fvae.bench.training.throughput, a few seconds each).
    Whole runs are counted (resumed ones too); the classifier and plots are not."""
    from fvae.bench import training as bench

    rates, runs_ = {}, []
    for c in run_configs:
        key = (c.model.to_json(sort_keys=True), c.train.batch_size)
        if key not in rates:
            rates[key] = bench.throughput(c)
        rate = rates[key]
        train = min(c.data.limit_train or NUM_TRAIN, NUM_TRAIN - c.data.validation_size)
        images = c.train.num_steps * c.train.batch_size or c.train.num_epochs * train
        epochs = images / train
        test = min(c.data.limit_test or NUM_TEST, c.eval.iwae_num_images or NUM_TEST)
        seconds = (images + EVAL_COST * epochs * c.data.validation_size) / \
            rate["train_images_per_sec"] + c.eval.iwae_samples * test / rate["iwae_draws_per_sec"]
        runs_.append({"name": c.name, "seed": c.seed, "train_images": images,
                      "iwae_draws": c.eval.iwae_samples * test, "seconds": seconds, **rate})
    return {"runs": runs_, "seconds": sum(r["seconds"] for r in runs_)}


def write_estimate(sweep_dir: pathlib.Path, run_configs) -> dict[str, Any]:
    """Logs the estimate and writes it to sweep_dir/estimate.json."""
    from fvae import provenance
    estimate = {**estimate_seconds(run_configs), "provenance": provenance.record()}
    (sweep_dir / "estimate.json").write_text(json.dumps(estimate, indent=2) + "\n")
    for r in estimate["runs"]:
        logging.info("estimate: %s seed %d: %.0f training images at %.0f images/s, %.0f IWAE "
                     "draws at %.0f/s: %.1f min", r["name"], r["seed"], r["train_images"],
                     r["train_images_per_sec"], r["iwae_draws"], r["iwae_draws_per_sec"],
                     r["seconds"] / 60)
    logging.info("estimate: %d runs left, about %.1f hours on this machine",
                 len(estimate["runs"]), estimate["seconds"] / 3600)
    return estimate


def summarize(sweep_dir: pathlib.Path, points: Sequence[Point], seeds: Sequence[int]
              ) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of every metric, one row per point."""
    rows = []
    for point in points:
        evals = []
        for seed in seeds:
            path = run_dir(sweep_dir, point, seed) / "eval.json"
            if path.exists():
                evals.append(json.loads(path.read_text()))
        row: dict[str, Any] = {**dict(point.values), "seeds": len(evals)}
        for metric in METRICS:
            values = [float(e[metric]) for e in evals if metric in e]
            if values:
                row[f"{metric}_mean"] = float(np.mean(values))
                row[f"{metric}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def write_results(sweep_dir: pathlib.Path, rows: list[dict[str, Any]]) -> None:
    """results.csv (every column) and results.md (mean ± std per metric)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    axes = [c for c in columns if not c.endswith(("_mean", "_std"))]
    metrics = [m for m in METRICS if f"{m}_mean" in columns]
    lines = ["| " + " | ".join(axes + metrics) + " |", "|" + "---|" * (len(axes) + len(metrics))]
    for row in rows:
        cells = [str(row.get(a, "")) for a in axes]
        for m in metrics:
            cells.append(f"{row[m + '_mean']:.4g} ± {row[m + '_std']:.2g}"
                         if f"{m}_mean" in row else "")
        lines.append("| " + " | ".join(cells) + " |")
    (sweep_dir / "results.md").write_text("\n".join(lines) + "\n")


def write_sweep_figures(sweep_dir: pathlib.Path, points: Sequence[Point], seeds: Sequence[int]
                  ) -> list[pathlib.Path]:
    """Test-ELBO curves grouped by each axis, and reconstructions side by side."""
    from fvae import plots
    from fvae.writer import read_metrics, series

    import matplotlib.pyplot as plt

    out = sweep_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    axes = [name for name, _ in points[0].values] if points else []
    for axis in axes:
        values = list(dict.fromkeys(dict(p.values)[axis] for p in points))
        colours = {v: plt.cm.tab10(i % 10) for i, v in enumerate(values)}
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for point in points:
            for seed in seeds:
                steps, elbo = series(read_metrics(run_dir(sweep_dir, point, seed)),
                                     "validation", "elbo")
                if len(steps):
                    ax.plot(steps, elbo, color=colours[dict(point.values)[axis]], alpha=0.7)
        for value in values:
            ax.plot([], [], color=colours[value], label=f"{axis}={value}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation negative ELBO (nats/image)")
        ax.set_title(f"Validation negative ELBO by {axis} (every point and seed)")
        ax.legend()
        paths.append(plots.save_figure(fig, out / f"elbo_by_{axis}.png"))
    for name, title, columns in (("reconstructions", "Test images and reconstructions", 1),
                                 ("samples", "Samples from the prior", 3)):
        found = [(point.name, run_dir(sweep_dir, point, seeds[0]) / "figures" / f"{name}.png")
                 for point in points]
        found = [(label, path) for label, path in found if path.exists()]
        if found:
            paths.append(_montage(found, out / f"{name}_by_point.png",
                                  f"{title}, by point (seed {seeds[0]})", columns))
    return paths


def _montage(panels: list[tuple[str, pathlib.Path]], path: pathlib.Path, title: str,
             columns: int) -> pathlib.Path:
    """The runs' own figures side by side, each under its point's name."""
    import matplotlib.pyplot as plt

    from fvae import plots

    images = [plt.imread(p) for _, p in panels]
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    width = 10 / columns  # inches per panel
    heights = [max(width * im.shape[0] / im.shape[1] for im in images[r * columns:][:columns])
               + 0.4 for r in range(rows)]  # + the panel title
    fig, axs = plt.subplots(rows, columns, figsize=(10, sum(heights) + 0.5), squeeze=False,
                            gridspec_kw={"height_ratios": heights}, layout="constrained")
    for ax in axs.flat:
        ax.axis("off")
    for ax, (label, _), image in zip(axs.flat, panels, images):
        ax.imshow(image)
        ax.set_title(label if columns == 1 else label.replace(",", "\n"), fontsize=8)
    fig.suptitle(title)
    return plots.save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m fvae.sweep`; given `argv` (a call from another program) it does not
    restart the process for huge pages (cpu.restart_with_huge_pages)."""
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Sweep config: a file or a packaged one's "
                                    "name (ablation:quick, study:cpu).")
    flags.DEFINE_string("sweep_dir", None, "Directory for every run of the sweep.")
    flags.DEFINE_string("data_dir", None, "Overrides data.dir of every run.")
    flags.DEFINE_bool("estimate_only", False, "Measure and log the cost of the runs left "
                      "(sweep_dir/estimate.json); train nothing.")
    flags.mark_flags_as_required(["config", "sweep_dir"])

    def parse(args: list[str]) -> list[str]:
        try:
            return app.parse_flags_with_usage(configs.resolve_config_flag(list(args)))
        except (configs.ConfigError, SyntaxError) as e:
            logs.exit_for_user_error("fvae-sweep", e)

    def run(_):
        from fvae.runs import USER_ERRORS  # (fvae.launch would define its flags)
        try:
            _run()
        except USER_ERRORS as e:
            logs.exit_for_user_error("fvae-sweep", e)

    def _run():
        from fvae import cpu
        sweep_config = flags.FLAGS.config
        first = point_config(sweep_config, grid(sweep_config)[0], sweep_config.seeds[0])
        if argv is None:  # an entry point, not a call from a program (which would restart)
            cpu.restart_with_huge_pages(first.runtime)  # first: it starts this process over
        logs.show_own_info()
        cpu.setup(first.runtime, (first.train.batch_size, first.runtime.eval_batch_size))
        if flags.FLAGS.estimate_only:
            sweep_dir = pathlib.Path(flags.FLAGS.sweep_dir)
            sweep_dir.mkdir(parents=True, exist_ok=True)
            left = left_to_run(sweep_config, sweep_dir,
                               run_configs(sweep_config, flags.FLAGS.data_dir))
            write_estimate(sweep_dir, left)
            return
        run_sweep(flags.FLAGS.config, flags.FLAGS.sweep_dir, flags.FLAGS.data_dir)
        print((pathlib.Path(flags.FLAGS.sweep_dir) / "results.md").read_text())

    if argv is None:
        logs.show_flags_in_help(__name__)
    app.run(run, argv, flags_parser=parse)


if __name__ == "__main__":
    main()
