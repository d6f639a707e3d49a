"""fvae.compare on 1, 2 and 5 runs built from one tiny trained run: runs of different
lengths, in progress, evaluated or not, and directories that are not runs."""

import csv
import json
import math
import pathlib

import matplotlib.pyplot as plt
import pytest

from conftest import tiny_config
from fvae import compare, train
from fvae.writer import read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tiny_data_dir, tmp_path_factory) -> pathlib.Path:
    """One tiny run of 2 epochs (8 steps per epoch)."""
    workdir = tmp_path_factory.mktemp("compare_runs") / "trained"
    train.train_and_evaluate(tiny_config(tiny_data_dir), str(workdir))
    return workdir


def make_run(source: pathlib.Path, workdir: pathlib.Path, epochs: int | None = None,
             evaluation: dict | None = None, **config_changes) -> pathlib.Path:
    """A copy of `source`'s config.json and metrics.jsonl, cut or extended to `epochs`
    (extra epochs repeat the last one with the loss lowered), config keys changed."""
    workdir.mkdir(parents=True)
    config = json.loads((source / "config.json").read_text())
    for key, value in config_changes.items():
        block, name = key.split("__") if "__" in key else (None, key)
        (config[block] if block else config)[name] = value
    (workdir / "config.json").write_text(json.dumps(config))
    records = read_metrics(source)
    if epochs is not None:
        last_epoch = [r for r in records if r["epoch"] == records[-1]["epoch"]]
        records = [r for r in records if r["epoch"] <= epochs]
        for epoch in range(records[-1]["epoch"] + 1 if records else 1, epochs + 1):
            records += [{**r, "epoch": epoch, "step": 8 * epoch, "loss": r["loss"] - epoch}
                        for r in last_epoch]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if evaluation is not None:
        (workdir / "eval.json").write_text(json.dumps(evaluation))
    return workdir


def last_test(workdir):
    return [r for r in read_metrics(workdir) if r["split"] == "validation"][-1]


def test_one_run_writes_figure_markdown_and_csv(trained, tmp_path, capsys):
    out = tmp_path / "out" / "comparison.png"
    compare.main([str(trained), "--out", str(out)])
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    height, width = plt.imread(out).shape[:2]
    assert height > 200 and width > 200
    printed = capsys.readouterr().out
    markdown = (tmp_path / "out" / "comparison.md").read_text()
    assert markdown in printed
    header, rule, row = markdown.splitlines()
    assert header.split(" | ")[:6] == ["| run", "likelihood", "beta", "latent_dim", "epochs",
                                       "source"]
    assert rule.count("---") == header.count("|") - 1
    assert "| tiny | bce | 1 | 2 | 2/2 | metrics.jsonl epoch 2 (validation) |" in row
    with open(tmp_path / "out" / "comparison.csv") as f:
        (csv_row,) = list(csv.DictReader(f))
    expected = last_test(trained)
    for key in ("loss", "recon", "kl", "elbo"):
        assert float(csv_row[key]) == pytest.approx(expected[key])
    assert csv_row["workdir"] == str(trained)


def test_two_runs_of_different_lengths(trained, tmp_path):
    long = make_run(trained, tmp_path / "long", epochs=4, name="long",
                    train__num_epochs=4, model__latent_dim=16, loss__beta=0.5)
    runs = [compare.read_run(trained), compare.read_run(long)]
    fig = compare.curves_figure(runs)
    assert len(fig.axes) == 4
    for ax in fig.axes:
        assert [len(line.get_xdata()) for line in ax.lines] == [2, 4]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["tiny: bce, β=1, latent 2", "long: bce, β=0.5, latent 16"]
    plt.close(fig)
    rows = compare.compare([trained, long], tmp_path / "c.png")
    assert [(r["run"], r["epochs"], r["latent_dim"]) for r in rows] == \
        [("tiny", "2/2", 2), ("long", "4/4", 16)]
    assert rows[1]["loss"] == pytest.approx(last_test(trained)["loss"] - 4)


def test_five_runs_with_eval_json_progress_and_repeated_names(trained, tmp_path):
    workdirs = [
        trained,
        make_run(trained, tmp_path / "evaluated",
                 evaluation={"elbo": 123.5, "iwae_nll": 120.25, "kl_per_dim": [0.5, 0.25],
                             "selection": {"rule": "validation", "step": 16}}),
        make_run(trained, tmp_path / "running", epochs=1, train__num_epochs=10),
        make_run(trained, tmp_path / "started", epochs=0),
        make_run(trained, tmp_path / "by_steps", name="mse", train__num_steps=36,
                 loss__likelihood="mse", loss__reduction="mean",
                 loss__beta_schedule="linear"),
    ]
    rows = compare.compare(workdirs, tmp_path / "five.png")
    by_dir = {pathlib.Path(r["workdir"]).name: r for r in rows}
    assert by_dir["evaluated"]["source"] == "eval.json"
    assert by_dir["evaluated"]["iwae_nll"] == 120.25 and "loss" not in by_dir["evaluated"]
    assert "kl_per_dim" not in by_dir["evaluated"]  # a list has no place in a table cell
    assert (by_dir["running"]["epochs"], by_dir["running"]["source"]) == \
        ("1/10", "metrics.jsonl epoch 1 (validation)")
    assert (by_dir["started"]["epochs"], by_dir["started"]["source"]) == ("0/2", "no epoch yet")
    assert by_dir["by_steps"]["epochs"] == "2/5"  # 36 steps of 8 per epoch
    assert (by_dir["by_steps"]["likelihood"], by_dir["by_steps"]["beta"]) == \
        ("mse/mean", "1 (linear)")
    assert [r["run"] for r in rows] == ["tiny [trained]", "tiny [evaluated]", "tiny [running]",
                                        "tiny [started]", "mse"]
    markdown = (tmp_path / "five.md").read_text().splitlines()
    assert len(markdown) == 2 + 5
    assert markdown[0].endswith("| loss | recon | kl | elbo | iwae_nll | workdir |")
    with open(tmp_path / "five.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["iwae_nll"] for r in table] == ["", "120.25", "", "", ""]
    assert (tmp_path / "five.png").stat().st_size > 0


def test_not_a_run_is_named_and_nothing_is_written(trained, tmp_path, capsys):
    stray = tmp_path / "stray"
    stray.mkdir()
    with pytest.raises(compare.NotARunError, match=r"'.*stray' is not a run directory: it "
                       "has no config.json and no metrics.jsonl"):
        compare.compare([trained, stray], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists() and not (tmp_path / "c.md").exists()
    with pytest.raises(SystemExit, match="missing' does not exist"):
        compare.main([str(trained), str(tmp_path / "missing"), "--out", str(tmp_path / "c.png")])
    with pytest.raises(ValueError, match="figure's path"):
        compare.compare([trained], tmp_path / "table.md")
    (stray / "eval.json").write_text("{")
    (stray / "config.json").write_text((trained / "config.json").read_text())
    with pytest.raises(ValueError, match="eval.json is not valid JSON"):
        compare.read_run(stray)
    (stray / "config.json").write_text("{")
    with pytest.raises(compare.NotARunError, match="stray/config.json is not valid JSON"):
        compare.read_run(stray)


def test_nonfinite_metrics_are_gaps_not_errors(trained, tmp_path):
    run = make_run(trained, tmp_path / "nan")
    records = read_metrics(run)
    records[-1]["kl"] = "nan"
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (row,) = compare.compare([run], tmp_path / "c.png")
    assert math.isnan(row["kl"])
    assert "| nan |" in compare.markdown_table([row])


def test_runs_of_an_earlier_fvae_are_marked_as_selected_on_test(trained, tmp_path):
    """A workdir from before validation selection (test lines only; eval.json without a
    selection record) is shown with its test curves, marked, never mixed in silently."""
    old = make_run(trained, tmp_path / "old")
    lines = (old / "metrics.jsonl").read_text().replace('"validation"', '"test"')
    (old / "metrics.jsonl").write_text(lines)
    old_evaluated = make_run(trained, tmp_path / "old_evaluated", evaluation={"elbo": 1.0})
    rows = compare.compare([trained, old, old_evaluated], tmp_path / "mixed.png")
    sources = [r["source"] for r in rows]
    assert sources[0] == "metrics.jsonl epoch 2 (validation)"
    assert sources[1] == "metrics.jsonl epoch 2 (test) (old rule: selected on test)"
    assert sources[2] == "eval.json (old rule: selected on test)"
    assert rows[1]["epochs"] == "2/2" and rows[1]["elbo"] == rows[0]["elbo"]


def test_runs_of_different_code_are_compared_with_a_warning(trained, tmp_path, capsys):
    from fvae import provenance
    one, two = make_run(trained, tmp_path / "one"), make_run(trained, tmp_path / "two")
    for workdir, commit in ((one, "abc"), (two, "def")):
        provenance.append(workdir, {"code": {"commit": commit, "dirty": False},
                                    "versions": {"jax": "0.10.0"}})
    compare.compare([one, two], tmp_path / "c.png")
    assert "code commit differs: tiny [one]: abc, tiny [two]: def" in capsys.readouterr().err
    three = make_run(trained, tmp_path / "three")  # without a record: nothing to compare
    compare.compare([one, three], tmp_path / "d.png")
    assert "differs" not in capsys.readouterr().err
