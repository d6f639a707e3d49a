"""A sweep's results as evidence: the small files of every run committed, and the tables
and figures made from those files alone, so that they cannot drift apart.

    python -m fvae.results --publish runs/study docs/results/study   # copy, then tabulate
    python -m fvae.results docs/results/study                        # tabulate again

`--no_run_figures` leaves out each run's figures (the sweep's figures stay): for a grid.

`--publish SWEEP_DIR` copies each run's eval.json, metrics.jsonl, config.json,
provenance.json and a few figures (never a checkpoint) to RESULTS_DIR/<point>/seed<k>/.
Then, from those files: RESULTS_DIR/results.md (one row per run), the rate-distortion
figure RESULTS_DIR/rate_distortion.png, and, with --readme, the README's block between
`<!-- results:NAME -->` and `<!-- /results:NAME -->` (NAME: RESULTS_DIR's name).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import sys
from typing import Any, Sequence

from fvae import compare

RUN_FILES = ("eval.json", "metrics.jsonl", "config.json", "provenance.json")
RUN_FIGURES = ("reconstructions.png", "samples.png", "latent_manifold.png",
               "latent_scatter.png", "iwae_vs_k.png", "loss_curves.png")
SWEEP_FIGURES = ("reconstructions_by_point.png", "samples_by_point.png")
# (column, eval.json key, format): the table's metrics, all on the test split.
COLUMNS = (("−ELBO", "elbo", ".1f"), ("KL (rate)", "kl", ".1f"),
           ("pixel MSE", "recon_mse", ".4f"), ("SSIM", "ssim", ".3f"),
           ("sharpness", "sharpness", ".3f"), ("FD samples", "fd_samples", ".1f"),
           ("active units", "active_units", "d"), ("probe acc.", "probe_accuracy", ".3f"))


def run_dirs(results_dir: pathlib.Path) -> list[pathlib.Path]:
    """Every run under results_dir (a directory with a config.json), sorted."""
    return sorted(p.parent for p in results_dir.glob("**/config.json"))


def publish(sweep_dir: pathlib.Path, results_dir: pathlib.Path,
            run_figures: bool = True) -> list[pathlib.Path]:
    """Copies the small files of every evaluated run of the sweep into results_dir, with
    each run's figures unless not `run_figures` (a large grid: the sweep's own figures,
    one row per point, show them all in a fraction of the bytes)."""
    copied = []
    for run in run_dirs(sweep_dir):
        if not (run / "eval.json").exists():
            print(f"skipped {run}: not evaluated yet", file=sys.stderr)
            continue
        out = results_dir / run.relative_to(sweep_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:
            if (run / name).exists():
                shutil.copy2(run / name, out / name)
        for name in RUN_FIGURES:  # (one published before and not now is stale: removed)
            source, target = run / "figures" / name, out / "figures" / name
            if run_figures and source.exists():
                target.parent.mkdir(exist_ok=True)
                shutil.copy2(source, target)
            elif target.exists():
                target.unlink()
        if (out / "figures").is_dir() and not any((out / "figures").iterdir()):
            (out / "figures").rmdir()
        copied.append(out)
    for name in SWEEP_FIGURES:
        if (sweep_dir / "figures" / name).exists():
            shutil.copy2(sweep_dir / "figures" / name, results_dir / name)
    return copied


def _cell(evaluation: dict[str, Any], key: str, fmt: str) -> str:
    value = evaluation.get(key)
    return "" if value is None else format(value, fmt)


def iwae_cell(evaluation: dict[str, Any]) -> str:
    """'NLL ± SE (K, N images)', the levelling-off verdict beside it."""
    if "iwae_nll" not in evaluation:
        return ""
    flat = "" if evaluation.get("iwae_levelled_off") else ", still falling"
    return (f"{evaluation['iwae_nll']:.1f} ± {evaluation.get('iwae_nll_se', float('nan')):.1f}"
            f" (K={evaluation['iwae_samples']}, N={evaluation['iwae_num_images']}{flat})")


def table(runs: Sequence[compare.Run]) -> str:
    """One row per run: its settings, how long it trained, the epoch selected on
    validation, the test IWAE bound and the test metrics of COLUMNS."""
    head = ["run", "likelihood", "β", "latent", "epochs", "selected (val −ELBO)",
            "IWAE NLL ± SE", *(c for c, _, _ in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, label in zip(runs, compare.labels(runs)):
        e, s = run.evaluation or {}, compare.settings(run)
        selection = e.get("selection") or {}
        epochs = run.epoch_records
        selected = next((r["epoch"] for r in epochs if r["step"] == selection.get("step")), "?")
        cells = [label, s["likelihood"], s["beta"], str(s["latent_dim"]),
                 compare.progress(run),
                 f"epoch {selected} ({selection.get('validation_elbo', float('nan')):.1f})",
                 iwae_cell(e), *(_cell(e, key, fmt) for _, key, fmt in COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rate_distortion_figure(runs: Sequence[compare.Run], path: pathlib.Path) -> pathlib.Path:
    """Rate (test KL, nats) against distortion (test pixel MSE, comparable across
    likelihoods), a point per run labelled by its beta, one colour per likelihood
    (Alemi et al. 2018, "Fixing a Broken ELBO")."""
    import matplotlib.pyplot as plt

    from fvae import plots

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours: dict[str, Any] = {}
    for run, label in zip(runs, compare.labels(runs)):
        e, s = run.evaluation or {}, compare.settings(run)
        if "kl" not in e or "recon_mse" not in e:
            continue
        colour = colours.setdefault(s["likelihood"], plt.cm.tab10(len(colours) % 10))
        ax.scatter(e["kl"], e["recon_mse"], color=colour, s=30)
        ax.annotate(f"β={s['beta'].split()[0]}" + (f" {label}" if len(runs) < 10 else ""),
                    (e["kl"], e["recon_mse"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    for likelihood, colour in colours.items():
        ax.scatter([], [], color=colour, label=likelihood)
    ax.set_xscale("log")
    ax.set_xlabel("rate: KL(q(z|x) || p(z)) on the test set (nats/image, log scale)")
    ax.set_ylabel("distortion: pixel MSE of the reconstruction")
    ax.set_title("Rate and distortion, one point per run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return plots.save_figure(fig, path)


def write(results_dir: pathlib.Path, readme: pathlib.Path | None = None) -> str:
    """results.md and rate_distortion.png from the files under results_dir, and the
    README's block of the same name. Returns the table."""
    runs = [compare.read_run(d) for d in run_dirs(results_dir)]
    if not runs:
        raise compare.NotARunError(f"{results_dir} holds no run (no */config.json)")
    text = table(runs)
    (results_dir / "results.md").write_text(text)
    rate_distortion_figure(runs, results_dir / "rate_distortion.png")
    if readme is not None:
        readme.write_text(replace_block(readme.read_text(), results_dir.name, text))
    return text


def replace_block(document: str, name: str, text: str) -> str:
    """The document with its `<!-- results:name -->` block's contents set to text."""
    pattern = re.compile(rf"(<!-- results:{re.escape(name)} -->\n).*?(<!-- /results:"
                         rf"{re.escape(name)} -->)", re.S)
    if not pattern.search(document):
        raise ValueError(f"the README has no <!-- results:{name} --> ... <!-- /results:{name} "
                         "--> block: add the two markers where the table goes.")
    return pattern.sub(lambda m: m.group(1) + text + m.group(2), document)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results_dir", type=pathlib.Path)
    parser.add_argument("--publish", type=pathlib.Path, metavar="SWEEP_DIR",
                        help="first copy the small files of this sweep's runs")
    parser.add_argument("--readme", type=pathlib.Path, help="also update this README's block")
    parser.add_argument("--no_run_figures", action="store_true",
                        help="with --publish: copy the sweep's figures, not every run's")
    args = parser.parse_args(argv)
    try:
        if args.publish:
            publish(args.publish, args.results_dir, run_figures=not args.no_run_figures)
        print(write(args.results_dir, args.readme), end="")
    except (compare.NotARunError, ValueError, json.JSONDecodeError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
