"""The sweep: a CI-sized ablation end to end, resumable, tabulated."""

import json

import ml_collections
import pytest

from conftest import write_experiment
from fvae import configs, sweep, train


def tiny_sweep(tmp_path, data_dir) -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.base = str(write_experiment(tmp_path / "tiny.py", data_dir,
                                  **{"report.num_figure_images": 4}))  # the sweep shows them
    s.warmup_epochs = 1.0
    s.axes = ml_collections.ConfigDict({"likelihood": ("mse-mean", "bce"),
                                        "warmup": ("on",)})
    s.seeds = (0, 1)
    s.vmap_seeds = "always"  # the accelerator path, on CPU
    s.overrides = ml_collections.ConfigDict({
        "train": {"num_epochs": 2},
        "eval": {"iwae_samples": 4, "classifier_epochs": 1, "probe_steps": 20,
                 "classifier_dir": str(tmp_path / "classifier")}})
    return s


def test_grid_maps_axis_values_to_config_overrides(tmp_path, tiny_data_dir):
    s = tiny_sweep(tmp_path, tiny_data_dir)
    s.axes.beta = (0.1, 1.0)
    points = sweep.grid(s)
    assert len(points) == 4
    config = sweep.point_config(s, points[0], seed=1)
    assert (config.loss.beta, config.loss.likelihood, config.loss.reduction) == (0.1, "mse", "mean")
    assert (config.seed, config.train.num_epochs, config.loss.beta_schedule) == (1, 2, "linear")
    s.axes.colour = ("red",)
    with pytest.raises(configs.ConfigError, match="colour"):
        sweep.grid(s)
    del s.axes.colour
    s.overrides.train = {"num_epochs": 2, "eval_batch_size": 500}  # an earlier fvae's key
    with pytest.raises(configs.ConfigError, match="train.eval_batch_size is now runtime"):
        sweep.point_config(s, points[0], seed=1)


def test_quick_sweep_runs_resumes_and_tabulates(tmp_path, tiny_data_dir, monkeypatch):
    s = tiny_sweep(tmp_path, tiny_data_dir)
    out = tmp_path / "sweep"
    calls = []  # every training goes through train_seeds (train_and_evaluate too)
    original = train.train_seeds
    monkeypatch.setattr(train, "train_seeds",
                        lambda cs, ws: calls.append([str(w) for w in ws]) or original(cs, ws))
    rows = sweep.run_sweep(s, out, progress=False)
    assert calls == [[str(sweep.run_dir(out, p, seed)) for seed in (0, 1)]
                     for p in sweep.grid(s)]  # each point's two seeds in one vmapped run
    assert [(r["likelihood"], r["seeds"]) for r in rows] == [("mse-mean", 2), ("bce", 2)]
    for row in rows:
        for metric in ("elbo", "iwae_nll", "ssim", "sharpness", "active_units",
                       "probe_accuracy", "fd_samples"):
            assert f"{metric}_mean" in row and f"{metric}_std" in row, metric
        assert row["elbo_std"] > 0  # two seeds really differ
    table = (out / "results.md").read_text()
    assert table.count("\n") == 4 and "±" in table
    assert (out / "results.csv").read_text().startswith("likelihood,warmup,seeds")
    for name in ("elbo_by_likelihood.png", "elbo_by_warmup.png",
                 "reconstructions_by_point.png", "samples_by_point.png"):
        assert (out / "figures" / name).stat().st_size > 1000

    # Rerunning trains nothing when every run is evaluated...
    calls.clear()
    sweep.run_sweep(s, out, progress=False)
    assert calls == []
    # ...and only the run whose evaluation is missing.
    victim = sweep.run_dir(out, sweep.grid(s)[1], 1)
    (victim / "eval.json").unlink()
    again = sweep.run_sweep(s, out, progress=False)
    assert calls == [[str(victim)]]
    assert json.loads((victim / "eval.json").read_text())["elbo"] == pytest.approx(
        again[1]["elbo_mean"] * 2 - json.loads(
            (sweep.run_dir(out, sweep.grid(s)[1], 0) / "eval.json").read_text())["elbo"])
    # Changed eval settings redo every evaluation (training is finished: no new steps).
    s.overrides.eval.iwae_samples = 3
    sweep.run_sweep(s, out, progress=False)
    for point in sweep.grid(s):
        for seed in (0, 1):
            run = sweep.run_dir(out, point, seed)
            assert json.loads((run / "eval.json").read_text())["eval_settings"][
                "iwae_samples"] == 3
            assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])[
                "step"] == 16  # resumed at its end: nothing more was trained


def test_only_a_run_trained_and_evaluated_as_configured_counts_as_done(tmp_path,
                                                                     tiny_data_dir):
    """A finished run whose length, data or loss the sweep has since changed is handed
    back to training (which resumes it or names the difference), never reported."""
    s = tiny_sweep(tmp_path, tiny_data_dir)
    config = sweep.point_config(s, sweep.grid(s)[0], 0)
    run = tmp_path / "run"
    train.write_config(config, run)
    (run / "eval.json").write_text(json.dumps({"eval_settings": configs.flatten(config.eval)}))
    assert not sweep.evaluated(run, config)  # an earlier fvae's: not chosen on validation
    (run / "eval.json").write_text(json.dumps({"eval_settings": configs.flatten(config.eval),
                                               "selection": {"validation_elbo": 400.0}}))
    assert sweep.evaluated(run, config)
    moved = config.copy_and_resolve_references()
    moved.data.dir = str(tmp_path / "elsewhere")  # where the data are is not the run
    assert sweep.evaluated(run, moved)
    for key, value in (("train.num_epochs", 3), ("data.limit_train", 32), ("loss.beta", 0.5),
                       ("eval.iwae_samples", 7)):
        other = config.copy_and_resolve_references()
        configs.set_key(other, key, value)
        assert not sweep.evaluated(run, other), key
    # Before a longer run trains on, the shorter run's evaluation is set aside (were that
    # training interrupted, config.json would already name the longer run); a run that
    # training will refuse keeps its evaluation.
    sweep.set_aside_shorter_evaluation(run, other)  # eval.iwae_samples: not a new run
    configs.set_key(other, "loss.beta", 0.5)
    sweep.set_aside_shorter_evaluation(run, other)
    assert (run / "eval.json").exists()
    longer = config.copy_and_resolve_references()
    longer.train.num_epochs = 3
    sweep.set_aside_shorter_evaluation(run, longer)
    assert not (run / "eval.json").exists() and (run / "eval.shorter_run.json").exists()


@pytest.mark.parametrize("preset,num_points", [("quick", 12), ("full", 48), ("likelihoods", 6)])
def test_ablation_presets_expand_to_valid_configs(preset, num_points, monkeypatch):
    import pathlib
    monkeypatch.chdir(pathlib.Path(__file__).parent.parent)  # sweep.base is repo-relative
    s = __import__("experiments.ablation", fromlist=["get_config"]).get_config(preset)
    points = sweep.grid(s)
    assert len(points) == num_points
    for point in points:
        sweep.point_config(s, point, s.seeds[-1])  # validates


def test_every_likelihood_axis_value_gives_a_valid_config(tmp_path, tiny_data_dir):
    s = tiny_sweep(tmp_path, tiny_data_dir)
    s.axes.likelihood = tuple(sweep.LIKELIHOODS)
    configs_by_value = {dict(p.values)["likelihood"]: sweep.point_config(s, p, 0)
                        for p in sweep.grid(s)}
    assert configs_by_value["cb"].loss.likelihood == "continuous_bernoulli"
    assert configs_by_value["sigma-learned"].model.decoder_scale == "shared"
    assert configs_by_value["dlogistic"].model.decoder_scale == "per_pixel"


def test_vmap_seeds_defaults_to_accelerators_only(tmp_path, tiny_data_dir):
    import jax
    s = tiny_sweep(tmp_path, tiny_data_dir)
    s.vmap_seeds = "auto"
    assert sweep.vmap_seeds(s) == (jax.default_backend() != "cpu")
    s.vmap_seeds = "yes"
    with pytest.raises(configs.ConfigError, match="sweep.vmap_seeds='yes'"):
        sweep.vmap_seeds(s)


@pytest.mark.parametrize("preset,num_points", [("cpu", 6), ("gpu", 6), ("rate_distortion", 12),
                                                ("warmup", 4)])
def test_study_presets_expand_to_valid_configs(preset, num_points, monkeypatch):
    import pathlib
    monkeypatch.chdir(pathlib.Path(__file__).parent.parent)  # experiments_dir is relative
    s = __import__("experiments.study", fromlist=["get_config"]).get_config(preset)
    points = sweep.grid(s)
    assert len(points) == num_points
    by_name = {sweep.point_config(s, p, s.seeds[-1]).name: sweep.point_config(s, p, 0)
               for p in points}
    if preset == "warmup":  # no KL warm-up: beta is constant from the first step
        assert all(c.loss.beta_schedule == "constant" for c in by_name.values())
    if preset in ("rate_distortion", "warmup"):
        return
    # each point is its experiment file as the file defines it, plus the sweep's length
    for name, config in by_name.items():
        own = configs.load_config_file(pathlib.Path("experiments") / f"{name}.py")
        assert (config.model.to_dict(), config.loss.to_dict()) == \
            (own.model.to_dict(), own.loss.to_dict()), name
    assert by_name["sharp_bce"].train.num_epochs == (10 if preset == "cpu" else 50)
    assert by_name["binarized_nll"].eval.iwae_samples >= 1000  # the paper's number
    assert by_name["sharp_bce"].eval.iwae_samples == 100


def test_experiment_axis_names_files_and_takes_their_overrides(tmp_path, tiny_data_dir):
    s = tiny_sweep(tmp_path, tiny_data_dir)
    write_experiment(tmp_path / "other.py", tiny_data_dir, **{"loss.beta": 0.5})
    s.experiments_dir = str(tmp_path)
    s.axes = ml_collections.ConfigDict({"experiment": ("tiny", "other"), "latent": (3,)})
    s.overrides_by_experiment = ml_collections.ConfigDict({"other": {"loss": {"beta": 0.25}}})
    first, second = (sweep.point_config(s, p, 0) for p in sweep.grid(s))
    assert (first.name, first.loss.beta, first.model.latent_dim) == ("tiny[latent=3]", 1.0, 3)
    assert (second.name, second.loss.beta) == ("other[latent=3]", 0.25)
    s.axes.experiment = ("missing",)
    with pytest.raises(configs.ConfigError, match="missing.py does not exist"):
        sweep.grid(s)


def test_the_estimate_counts_every_image_and_draw(tmp_path, tiny_data_dir, monkeypatch):
    from fvae.bench import training as bench
    monkeypatch.setattr(bench, "throughput", lambda c: {"train_images_per_sec": 100.0,
                                                        "iwae_draws_per_sec": 1000.0})
    s = tiny_sweep(tmp_path, tiny_data_dir)
    config = sweep.point_config(s, sweep.grid(s)[0], 0)
    config.data.limit_train, config.data.limit_test = 1000, 500
    config.eval.iwae_num_images, config.eval.iwae_samples = 0, 10
    estimate = sweep.write_estimate(tmp_path, [config])
    validation = config.data.validation_size  # one forward pass per epoch
    expected = (2 * 1000 + sweep.EVAL_COST * 2 * validation) / 100 + 10 * 500 / 1000
    assert estimate["seconds"] == pytest.approx(expected)
    assert json.loads((tmp_path / "estimate.json").read_text())["runs"][0]["train_images"] == 2000


def test_the_estimate_measures_this_machine(tmp_path, tiny_data_dir):
    s = tiny_sweep(tmp_path, tiny_data_dir)
    config = sweep.point_config(s, sweep.grid(s)[0], 0)
    config.train.batch_size = 8
    rates = __import__("fvae.bench.training", fromlist=["x"]).throughput(config, steps=2,
                                                                        iwae_samples=4)
    assert rates["train_images_per_sec"] > 0 and rates["iwae_draws_per_sec"] > 0


def test_the_sweep_command_reports_a_users_mistake_in_one_line(tmp_path):
    """The command line end to end, as far as its first check: a sweep whose base
    experiment does not exist ends with one line and status 2, no traceback."""
    import subprocess
    import sys
    config = tmp_path / "bad_sweep.py"
    config.write_text("from fvae.experiments import ablation\n\n"
                      "def get_config():\n    s = ablation.get_config('quick')\n"
                      "    s.base = 'no/such/experiment.py'\n    return s\n")
    result = subprocess.run([sys.executable, "-m", "fvae.sweep", "--config", str(config),
                             "--sweep_dir", str(tmp_path / "sweep"), "--estimate_only"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "fvae-sweep: ConfigError" in result.stderr and "Traceback" not in result.stderr
