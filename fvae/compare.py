"""Compare runs: their validation curves overlaid, and a table of each run's final metrics.

    fvae-compare runs/a runs/b ... --out comparison.png
    python -m fvae.compare runs/study/*/seed0 --out runs/study/comparison.png

writes comparison.png (validation loss, recon, KL and -ELBO per epoch) and, next to
it, comparison.md and comparison.csv, and prints the Markdown table. A run's final
metrics come from its eval.json when there is one (the test set, for the checkpoint
selected on validation), else from the last validation line of its metrics.jsonl, so
runs still in progress can be compared too; the `source` column says which. Runs of
an earlier fvae, whose checkpoints were selected on the test set, are marked so.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import pathlib
import sys
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.figure  # noqa: E402
import matplotlib.ticker  # noqa: E402

from fvae import provenance  # noqa: E402
from fvae.writer import read_metrics, series  # noqa: E402

CURVES = (("loss", "loss (recon + β·KL)"), ("recon", "recon"),
          ("kl", "KL (nats)"), ("elbo", "−ELBO at β = 1 (nats)"))
FINAL_KEYS = ("loss", "recon", "kl", "elbo")  # taken from the last validation line
SETTING_COLUMNS = ("run", "likelihood", "beta", "latent_dim", "epochs", "source")


class NotARunError(FileNotFoundError):
    """A directory given as a run is not a training workdir."""


@dataclasses.dataclass(frozen=True)
class Run:
    """What compare reads from one workdir."""
    workdir: pathlib.Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    evaluation: dict[str, Any] | None  # eval.json, if the run has been evaluated

    @property
    def old_rule(self) -> bool:
        """Trained before validation selection: its epoch lines (and best checkpoint)
        are of the test set. Such runs are marked wherever they are shown."""
        return not any(r.get("split") == "validation" for r in self.records) and \
            any(r.get("split") == "test" for r in self.records)

    @property
    def epoch_split(self) -> str:
        return "test" if self.old_rule else "validation"

    @property
    def epoch_records(self) -> list[dict[str, Any]]:
        """The per-epoch evaluation lines: validation (test for an old-rule run)."""
        return [r for r in self.records if r.get("split") == self.epoch_split]


def read_run(workdir: str | os.PathLike) -> Run:
    """Reads config.json, metrics.jsonl (possibly empty) and eval.json (optional)."""
    path = pathlib.Path(workdir)
    if not path.is_dir():
        raise NotARunError(f"{str(path)!r} does not exist or is not a directory; pass training "
                           "workdirs (the --workdir given to launch.py).")
    if not (path / "config.json").is_file():
        missing = "config.json" + ("" if (path / "metrics.jsonl").exists()
                                   else " and no metrics.jsonl")
        raise NotARunError(f"{str(path)!r} is not a run directory: it has no {missing}. Pass "
                           "workdirs written by launch.py (fvae.train.train_and_evaluate).")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise NotARunError(f"{path / 'config.json'} is not valid JSON ({e}); restore it from "
                           "the checkpoint's copy (checkpoints/latest/*/meta) or leave the "
                           "run out.") from e
    evaluation = None
    if (path / "eval.json").is_file():
        try:
            evaluation = json.loads((path / "eval.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path / 'eval.json'} is not valid JSON ({e}); rerun the "
                             "evaluation or delete the file to use metrics.jsonl.") from e
    return Run(path, config, read_metrics(path), evaluation)


def settings(run: Run) -> dict[str, Any]:
    """The settings that tell runs apart: likelihood (with mse's reduction or gaussian's
    variance), beta, latent_dim."""
    loss = run.config.get("loss", {})
    likelihood = loss.get("likelihood", "?")
    if likelihood == "mse":  # only mse has a choice of reduction
        likelihood += f"/{loss.get('reduction', '?')}"
    elif likelihood == "gaussian":
        likelihood += f"/{loss.get('gaussian_variance', '?')} variance"
    beta = f"{loss.get('beta', float('nan')):g}"
    if loss.get("beta_schedule", "constant") != "constant":
        beta += f" ({loss['beta_schedule']})"
    return {"likelihood": likelihood, "beta": beta,
            "latent_dim": run.config.get("model", {}).get("latent_dim", "?")}


def progress(run: Run) -> str:
    """'done/planned' epochs, e.g. '3/10' for a run in progress ('?' if unknown)."""
    tests = run.epoch_records
    done = tests[-1]["epoch"] if tests else 0
    train = run.config.get("train", {})
    planned: Any = train.get("num_epochs", "?")
    if train.get("num_steps"):
        planned = "?"
        if tests and tests[0]["epoch"]:
            steps_per_epoch = tests[0]["step"] // tests[0]["epoch"]
            planned = math.ceil(train["num_steps"] / steps_per_epoch)
    return f"{done}/{planned}"


def final_metrics(run: Run) -> tuple[dict[str, Any], str]:
    """(metrics, source): eval.json's scalars (the test set) if present (lists such as
    kl_per_dim do not fit a table cell), else the last validation line. A run whose
    checkpoint was selected on the test set (an earlier fvae) says so in `source`."""
    old = " (old rule: selected on test)" if run.old_rule or (
        run.evaluation is not None and "selection" not in run.evaluation) else ""
    if run.evaluation is not None:
        return ({k: v for k, v in run.evaluation.items()
                 if not isinstance(v, (list, dict))}, "eval.json" + old)
    lines = run.epoch_records
    if not lines:
        return {}, "no epoch yet"
    last = lines[-1]
    return ({k: float(last[k]) for k in FINAL_KEYS if k in last},
            f"metrics.jsonl epoch {last['epoch']} ({run.epoch_split}){old}")


def labels(runs: Sequence[Run]) -> list[str]:
    """Each run's config name, with its directory name where names repeat."""
    names = [run.config.get("name", run.workdir.name) for run in runs]
    return [f"{name} [{run.workdir.name}]" if names.count(name) > 1 else name
            for name, run in zip(names, runs)]


def table_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per run: settings, progress, source, then its final metrics."""
    rows = []
    for run, label in zip(runs, labels(runs)):
        metrics, source = final_metrics(run)
        rows.append({"run": label, **settings(run), "epochs": progress(run), "source": source,
                     **metrics, "workdir": str(run.workdir)})
    return rows


def columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Setting columns, then every metric in order of first appearance, then workdir."""
    metric_columns = []
    for row in rows:
        metric_columns += [k for k in row if k not in SETTING_COLUMNS
                           and k != "workdir" and k not in metric_columns]
    return [*SETTING_COLUMNS, *metric_columns, "workdir"]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.5g}"
    return "" if value is None else str(value)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a GitHub Markdown table; missing metrics are blank."""
    cols = columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(row.get(c)).replace("|", "\\|") for c in cols) + " |"
              for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns(rows), restval="")
        writer.writeheader()
        writer.writerows(rows)


def curves_figure(runs: Sequence[Run]) -> matplotlib.figure.Figure:
    """2x2 panels of validation loss, recon, KL and -ELBO per epoch, one line per run
    (an old-rule run's test lines, marked as such)."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for run, label in zip(runs, labels(runs)):
        s = settings(run)
        name = f"{label}: {s['likelihood']}, β={s['beta']}, latent {s['latent_dim']}" + (
            " (old rule: test split)" if run.old_rule else "")
        for ax, (key, _) in zip(axes.flat, CURVES):
            epochs, values = series(run.records, run.epoch_split, key)
            ax.plot(epochs, values, marker="o" if len(epochs) < 20 else None,
                    markersize=3, label=name)
    for ax, (_, title) in zip(axes.flat, CURVES):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("per image")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(f"Comparison of {len(runs)} run{'s' * (len(runs) > 1)} (validation split)")
    fig.tight_layout()
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=1 if len(runs) < 3 else 2, frameon=False)
    return fig


def plot_curves(runs: Sequence[Run], path: pathlib.Path) -> pathlib.Path:
    """Saves `curves_figure(runs)` to `path` (the legend sits below the panels)."""
    fig = curves_figure(runs)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def provenance_differences(runs: Sequence[Run]) -> list[str]:
    """Where the runs' code commits or library versions differ (the last session of
    each run's provenance.json; runs without one are left out)."""
    latest = {label: sessions[-1] for run, label in zip(runs, labels(runs))
              if (sessions := provenance.read(run.workdir))}
    return provenance.differences(latest) if len(latest) > 1 else []


def compare(workdirs: Sequence[str | os.PathLike], out: str | os.PathLike
            ) -> list[dict[str, Any]]:
    """Writes `out` (curves) and out's .md and .csv siblings (final metrics); returns
    the table rows. Every workdir is checked before anything is written."""
    if not workdirs:
        raise ValueError("compare needs at least one workdir.")
    out = pathlib.Path(out)
    if out.suffix.lower() in ("", ".md", ".csv"):
        raise ValueError(f"--out {out} should be the figure's path, e.g. comparison.png; "
                         "the .md and .csv tables are written next to it.")
    runs = [read_run(w) for w in workdirs]
    for difference in provenance_differences(runs):
        print(f"warning: the runs were made by different code or libraries: {difference}",
              file=sys.stderr)
    plot_curves(runs, out)
    rows = table_rows(runs)
    out.with_suffix(".md").write_text(markdown_table(rows))
    write_csv(rows, out.with_suffix(".csv"))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdirs", nargs="+", help="training workdirs to compare")
    parser.add_argument("--out", default="comparison.png",
                        help="figure path; the .md and .csv tables go next to it")
    args = parser.parse_args(argv)
    try:
        rows = compare(args.workdirs, args.out)
    except (NotARunError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(markdown_table(rows), end="")
    out = pathlib.Path(args.out)
    print(f"\nwrote {out}, {out.with_suffix('.md')} and {out.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
