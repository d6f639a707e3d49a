"""Published results: copied without checkpoints, tabulated from the copied files alone,
and the committed tables equal to what their files give."""

import json
import pathlib

import pytest

from fvae import results

ROOT = pathlib.Path(__file__).resolve().parent.parent


def fake_run(directory: pathlib.Path, name: str, likelihood: str, beta: float, kl: float,
             mse: float, levelled_off: bool = True) -> pathlib.Path:
    """The files a trained, evaluated run leaves (and a checkpoint, never to be copied)."""
    (directory / "figures").mkdir(parents=True)
    (directory / "checkpoints" / "best").mkdir(parents=True)
    (directory / "checkpoints" / "best" / "data").write_bytes(b"\0" * 64)
    (directory / "figures" / "samples.png").write_bytes(b"png")
    config = {"name": name, "loss": {"likelihood": likelihood, "reduction": "sum",
                                     "beta": beta, "beta_schedule": "constant"},
              "model": {"latent_dim": 32}, "train": {"num_epochs": 2}}
    (directory / "config.json").write_text(json.dumps(config))
    lines = [{"split": "validation", "epoch": e, "step": 10 * e, "elbo": 300.0 - e}
             for e in (1, 2)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    evaluation = {"elbo": 290.0 + kl, "kl": kl, "recon_mse": mse, "ssim": 0.5,
                  "sharpness": 0.25, "fd_samples": 12.5, "active_units": 7,
                  "probe_accuracy": 0.75, "iwae_nll": 280.25, "iwae_nll_se": 1.5,
                  "iwae_samples": 100, "iwae_num_images": 1000,
                  "iwae_levelled_off": levelled_off,
                  "selection": {"step": 10, "validation_elbo": 299.0}}
    (directory / "eval.json").write_text(json.dumps(evaluation))
    return directory


def test_publish_copies_the_evidence_and_tabulates_it(tmp_path):
    sweep_dir, out = tmp_path / "sweep", tmp_path / "docs" / "study"
    fake_run(sweep_dir / "experiment-a" / "seed0", "a", "bce", 0.01, 30.0, 0.01)
    fake_run(sweep_dir / "experiment-b" / "seed0", "b", "mse", 1.0, 8.0, 0.02, False)
    (sweep_dir / "experiment-c" / "seed0").mkdir(parents=True)  # still training
    (sweep_dir / "experiment-c" / "seed0" / "config.json").write_text("{}")
    copied = results.publish(sweep_dir, out)
    assert [p.relative_to(out).as_posix() for p in copied] == \
        ["experiment-a/seed0", "experiment-b/seed0"]
    assert not list(out.glob("**/checkpoints"))
    assert (out / "experiment-a" / "seed0" / "figures" / "samples.png").read_bytes() == b"png"
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:study -->\nold\n<!-- /results:study -->\nend\n")
    text = results.write(out, readme)
    rows = text.splitlines()[2:]
    assert len(rows) == 2
    assert rows[0].startswith("| a | bce | 0.01 | 32 | 2/2 | epoch 1 (299.0) | "
                              "280.2 ± 1.5 (K=100, N=1000) | 320.0 | 30.0 | 0.0100 |")
    assert "still falling" in rows[1] and "| mse/sum | 1 |" in rows[1]
    assert readme.read_text() == f"intro\n<!-- results:study -->\n{text}<!-- /results:study -->\nend\n"
    assert (out / "results.md").read_text() == text
    assert (out / "rate_distortion.png").stat().st_size > 1000


def test_publish_can_leave_each_runs_figures_out(tmp_path):
    sweep_dir, out = tmp_path / "sweep", tmp_path / "docs" / "grid"
    fake_run(sweep_dir / "point-a" / "seed0", "a", "bce", 0.01, 30.0, 0.01)
    (sweep_dir / "figures").mkdir()
    (sweep_dir / "figures" / "samples_by_point.png").write_bytes(b"grid")
    figure = sweep_dir / "point-a" / "seed0" / "figures" / results.RUN_FIGURES[0]
    figure.parent.mkdir(parents=True, exist_ok=True)
    figure.write_bytes(b"figure")
    results.main([str(out), "--publish", str(sweep_dir)])  # published with its figures
    assert (out / "point-a" / "seed0" / "figures" / figure.name).exists()
    results.main([str(out), "--publish", str(sweep_dir), "--no_run_figures"])
    assert (out / "point-a" / "seed0" / "eval.json").exists()
    assert not (out / "point-a" / "seed0" / "figures").exists()  # the stale one is gone
    assert (out / "samples_by_point.png").read_bytes() == b"grid"


def test_a_readme_without_the_block_is_named():
    with pytest.raises(ValueError, match="results:study"):
        results.replace_block("no markers\n", "study", "table")


@pytest.mark.parametrize("results_dir", sorted(p.parent for p in
                                               (ROOT / "docs" / "results").glob("*/results.md")),
                         ids=lambda p: p.name)
def test_committed_tables_are_made_from_the_committed_files(results_dir):
    from fvae import compare
    runs = [compare.read_run(d) for d in results.run_dirs(results_dir)]
    text = results.table(runs)
    assert (results_dir / "results.md").read_text() == text
    for page in (ROOT / "README.md", ROOT / "docs" / "results.md"):
        document = page.read_text()
        if f"<!-- results:{results_dir.name} -->" in document:
            assert results.replace_block(document, results_dir.name, text) == document, page
