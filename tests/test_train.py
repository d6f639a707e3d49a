import json
import os
import subprocess
import sys
import pathlib

import jax
import numpy as np
import pytest

from conftest import assert_params_close, params_equal, tiny_config
from fvae import configs, cpu, runs, steps, train
from fvae.writer import read_metrics

ROOT = pathlib.Path(__file__).parent.parent


def test_training_lowers_the_test_loss_and_writes_the_run(make_config, tmp_path):
    config = make_config(**{"train.num_epochs": 4, "report.num_figure_images": 4})
    state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 4 * (256 // 32)
    records = read_metrics(tmp_path)
    test = [r for r in records if r["split"] == "validation"]
    assert [r["epoch"] for r in test] == [1, 2, 3, 4]
    losses = [r["loss"] for r in test]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # falls every epoch
    assert losses[-1] < losses[0] - 40, losses  # by a clear margin (noise floor ~380)
    for r in records:
        assert {"split", "epoch", "step", "wall_time", "loss", "recon", "kl", "beta",
                "elbo"} <= set(r)
    assert all({"ssim", "psnr", "sharpness", "active_units"} <= set(r) for r in test)
    assert all(r["images_per_sec"] > 0 for r in records if r["split"] == "train")
    assert json.loads((tmp_path / "config.json").read_text())["name"] == "tiny"
    for name in ("reconstructions.png", "samples.png"):
        assert (tmp_path / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_parameters_other_seed_other(make_config, tmp_path):
    a = train.train_and_evaluate(make_config(), str(tmp_path / "a"))
    b = train.train_and_evaluate(make_config(), str(tmp_path / "b"))
    c = train.train_and_evaluate(make_config(seed=1), str(tmp_path / "c"))
    assert params_equal(a.params, b.params)
    assert not params_equal(a.params, c.params)
    assert read_metrics(tmp_path / "a")[-1]["loss"] == read_metrics(tmp_path / "b")[-1]["loss"]


def test_steps_per_dispatch_does_not_change_the_result(make_config, tmp_path):
    one = train.train_and_evaluate(make_config(**{"runtime.steps_per_dispatch": 1}),
                                   str(tmp_path / "one"))
    # 3 does not divide the 8 steps of an epoch: chunks of 3, 3, 2 per epoch.
    three = train.train_and_evaluate(make_config(**{"runtime.steps_per_dispatch": 3}),
                                     str(tmp_path / "three"))
    assert_params_close(one.params, three.params, rtol=1e-4, atol=1e-5)


def test_num_steps_overrides_epochs_and_warmup_reaches_beta(make_config, tmp_path):
    config = make_config(**{"train.num_steps": 12, "loss.beta": 0.5,
                            "loss.beta_schedule": "linear", "loss.warmup_steps": 6})
    state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 12
    test = [r for r in read_metrics(tmp_path) if r["split"] == "validation"]
    assert [r["step"] for r in test] == [8, 12]
    assert test[-1]["beta"] == pytest.approx(0.5)


@pytest.mark.parametrize("overrides", [
    {"model.name": "keras"},
    {"loss.likelihood": "mse", "loss.reduction": "mean"},
    {"optim.lr_schedule": "warmup_cosine", "optim.lr_warmup_steps": 2,
     "optim.grad_clip_norm": 1.0, "loss.beta_schedule": "cyclical"},
])
def test_other_models_and_options_train(make_config, tmp_path, overrides):
    config = make_config(**{"train.num_epochs": 1, **overrides})
    train.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(read_metrics(tmp_path)[-1]["loss"])


def test_non_finite_loss_stops_with_the_step_named(make_config, tmp_path):
    config = make_config(**{"optim.learning_rate": 1e12, "optim.name": "sgd",
                            "report.log_every_steps": 1})
    with pytest.raises(train.NonFiniteLossError, match=r"step \d+: .*loss="):
        train.train_and_evaluate(config, str(tmp_path))


def run_launch(*args):
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_launch_trains_with_command_line_overrides(tiny_data_dir, tmp_path):
    result = run_launch(
        "--config", "experiments/keras_dh2.py", "--workdir", str(tmp_path),
        f"--config.data.dir={tiny_data_dir}", "--config.data.verify_checksums=False",
        "--config.data.validation_size=64",
        "--config.train.num_steps=4", "--config.train.batch_size=32",
        "--config.report.progress_bar=False")
    assert result.returncode == 0, result.stderr[-2000:]
    if cpu.huge_pages_restart_env(configs.get_base_config().runtime) is not None:
        assert "restarted with GLIBC_TUNABLES" in result.stderr  # this machine allows it
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["name"] == "keras" and saved["train"]["num_steps"] == 4
    assert read_metrics(tmp_path)[-1]["step"] == 4
    for name in ("reconstructions", "samples", "latent_manifold", "latent_scatter",
                 "loss_curves"):
        (tmp_path / "figures" / f"{name}.png").unlink()
    result = run_launch("--config", "experiments/keras_dh2.py", "--workdir", str(tmp_path),
                        f"--config.data.dir={tiny_data_dir}", "--mode", "plot",
                        "--config.data.verify_checksums=False",
                        "--config.data.validation_size=64")
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("reconstructions", "samples", "latent_manifold", "latent_scatter",
                 "loss_curves"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 1000
    assert list((tmp_path / "tensorboard").iterdir()), "TensorBoard events are written"
    result = run_launch("--config", "experiments/keras_dh2.py", "--workdir", str(tmp_path),
                        f"--config.data.dir={tiny_data_dir}", "--mode", "eval",
                        "--config.data.verify_checksums=False", "--config.data.validation_size=64",
                        "--config.eval.iwae_samples=3", "--config.eval.classifier_epochs=1",
                        f"--config.eval.classifier_dir={tmp_path / 'classifier'}",
                        "--config.eval.probe_steps=5")
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["iwae_samples"] == 3 and results["iwae_nll"] <= results["elbo"] + 1e-3
    validation = [r for r in read_metrics(tmp_path) if r["split"] == "validation"]
    chosen = min(validation, key=lambda r: r["elbo"])  # the rule, recorded with the numbers
    assert results["selection"]["rule"].startswith("the epoch end of the lowest validation")
    assert results["selection"]["step"] == chosen["step"] == results["checkpoint_step"]
    assert results["selection"]["validation_elbo"] == pytest.approx(chosen["elbo"])


def test_launch_rejects_unknown_keys_and_bad_values(tmp_path):
    """One line naming the key and the fix, no traceback, before any work."""
    result = run_launch("--config", "experiments/sharp_bce.py", "--workdir", str(tmp_path),
                        "--config.model.latent_dims=3")
    assert result.returncode != 0 and "unknown config key(s): model.latent_dims" in result.stderr
    result = run_launch("--config", "experiments/sharp_bce.py", "--workdir", str(tmp_path),
                        "--config.train.cpu_devices=2")  # an earlier fvae's key
    assert result.returncode != 0
    assert "train.cpu_devices is now runtime.cpu_devices" in result.stderr
    result = run_launch("--config", "experiments/sharp_bce.py", "--workdir", str(tmp_path),
                        "--config.loss.beta=-1")
    assert result.returncode == 2 and "config.loss.beta=-1" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_launch_shows_a_config_syntax_error_as_file_line_and_caret(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import ml_collections\n\ndef get_config(:\n    pass\n")
    result = run_launch("--config", str(bad), "--workdir", str(tmp_path / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f'File "{bad}", line 3' in result.stderr and "^" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 6, result.stderr
    shown = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--config", str(bad),
                            "--workdir", str(tmp_path / "run")], capture_output=True,
                           text=True, cwd=ROOT, timeout=300, env={**os.environ,
                                                                  "FVAE_TRACEBACK": "1"})
    assert shown.returncode != 0 and "Traceback" in shown.stderr


def test_dynamic_binarization_trains_on_fresh_binary_draws(make_config, tmp_path):
    from fvae import binarize, models
    config = make_config(**{"data.binarize": "dynamic", "train.num_steps": 2})
    model = models.build_model(config.model)
    state = steps.create_train_state(config, model, jax.random.key(0), 2)
    binarized_step = jax.jit(steps.make_train_step(model, config.loss, lambda s: 1.0,
                                                   binarize_inputs=True))
    plain_step = jax.jit(steps.make_train_step(model, config.loss, lambda s: 1.0))
    batch = np.full((4, 28, 28), 128, np.uint8)
    key = jax.random.key(1)
    binary = binarize.binarize(jax.random.fold_in(key, 1), batch)
    assert set(np.unique(np.asarray(binary))) == {0, 255}
    assert 0.4 < float((np.asarray(binary) == 255).mean()) < 0.6  # p = 128/255
    _, with_flag = binarized_step(state, batch, key)
    _, on_binary = plain_step(state, binary, key)
    _, on_grey = plain_step(state, batch, key)
    assert float(with_flag["loss"]) == pytest.approx(float(on_binary["loss"]), rel=1e-6)
    assert float(with_flag["loss"]) != pytest.approx(float(on_grey["loss"]), rel=1e-3)
    # Another step key gives another draw.
    _, other = binarized_step(state, batch, jax.random.key(2))
    assert float(other["loss"]) != float(with_flag["loss"])
    state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 2


def test_vmapped_seeds_match_separate_runs(make_config, tmp_path):
    seeds = (0, 1)
    together = train.train_seeds(
        [make_config(seed=s, **{"report.num_figure_images": 4}) for s in seeds],
        [tmp_path / f"v{s}" for s in seeds])
    for s, state in zip(seeds, together):
        alone = train.train_and_evaluate(make_config(seed=s), str(tmp_path / f"s{s}"))
        assert int(state.step) == int(alone.step) == 2 * (256 // 32)
        assert_params_close(state.params, alone.params)
        v, a = read_metrics(tmp_path / f"v{s}"), read_metrics(tmp_path / f"s{s}")
        assert [(r["split"], r["epoch"]) for r in v] == [(r["split"], r["epoch"]) for r in a]
        for rv, ra in zip(v, a):
            assert rv["loss"] == pytest.approx(ra["loss"], rel=1e-4)
        assert (tmp_path / f"v{s}" / "figures" / "samples.png").exists()
        assert (tmp_path / f"v{s}" / "checkpoints" / "best").is_dir()
    assert not params_equal(together[0].params, together[1].params)  # seeds really differ


def test_vmapped_seeds_resume_exactly(make_config, tmp_path):
    dirs = [tmp_path / "r0", tmp_path / "r1"]
    reference = train.train_seeds([make_config(seed=s, **{"train.num_epochs": 3})
                                   for s in (0, 1)], [tmp_path / "u0", tmp_path / "u1"])
    train.train_seeds([make_config(seed=s, **{"train.num_epochs": 1}) for s in (0, 1)], dirs)
    resumed = train.train_seeds([make_config(seed=s, **{"train.num_epochs": 3})
                                 for s in (0, 1)], dirs)
    for a, b in zip(reference, resumed):
        assert params_equal(a.params, b.params)


def test_seeds_at_different_steps_train_one_after_another(make_config, tmp_path):
    train.train_and_evaluate(make_config(seed=0, **{"train.num_epochs": 1}),
                             str(tmp_path / "m0"))  # seed 0 has a checkpoint, seed 1 none
    mixed = train.train_seeds([make_config(seed=s) for s in (0, 1)],
                              [tmp_path / "m0", tmp_path / "m1"])
    for s, state in zip((0, 1), mixed):
        alone = train.train_and_evaluate(make_config(seed=s), str(tmp_path / f"a{s}"))
        assert params_equal(state.params, alone.params)  # the plain, unvmapped path


def test_runs_trained_together_must_differ_only_in_seed(make_config, tmp_path):
    with pytest.raises(train.configs.ConfigError, match=r"differ only in seed.*loss.beta"):
        train.train_seeds([make_config(seed=0), make_config(seed=1, **{"loss.beta": 0.5})],
                          [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(train.configs.ConfigError, match="distinct seeds"):
        train.train_seeds([make_config(seed=0), make_config(seed=0)],
                          [tmp_path / "a", tmp_path / "b"])


def test_close_all_closes_everything_then_raises_the_first_failure():
    closed = []

    class Checkpointer:
        def __init__(self, name, fail):
            self.name, self.fail = name, fail

        def wait(self):
            if self.fail:
                raise OSError(f"disk full under {self.name}")

        def close(self):
            closed.append(self.name)

    class Writer:
        def close(self):
            closed.append("writer")

    class Run:  # what close_all reads of a train.Run
        def __init__(self, ckpt, writer):
            self.ckpt, self.writer = ckpt, writer

    runs_ = [Run(Checkpointer("a", True), Writer()), Run(None, None),
             Run(Checkpointer("b", True), None)]
    with pytest.raises(OSError, match="under a"):
        train.close_all(runs_)
    assert closed == ["a", "b", "writer"]
    closed.clear()
    train.close_all(runs_, raise_first=False)  # an error is already in flight
    assert closed == ["a", "b", "writer"]


def test_runs_trained_together_need_their_own_workdirs(make_config, tmp_path):
    with pytest.raises(ValueError, match="one workdir each"):
        train.train_seeds([make_config(seed=0), make_config(seed=1)],
                          [tmp_path / "same", tmp_path / "same"])


TIMING_KEYS = {"wall_time", "images_per_sec", "eval_seconds"}


def untimed(records: list[dict], splits=("train", "validation")) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records
            if r["split"] in splits]


def test_validation_images_are_never_trained_on_and_the_test_set_decides_nothing(tmp_path):
    """Three datasets that differ only in the held-out validation images' pixels, or
    only in the test images' pixels. The first trains exactly as the original (the
    validation images reach no batch); the second trains and selects exactly as it
    too, even while logging test lines (the test set reaches no decision)."""
    from conftest import make_images
    from fvae import data
    original = dict(zip(("train_images", "train_labels"), make_images(320, 0)))
    original.update(zip(("test_images", "test_labels"), make_images(64, 1)))
    _, held = data.validation_split(320, 64)
    other_validation = {**original, "train_images": original["train_images"].copy()}
    other_validation["train_images"][held] = 255 - other_validation["train_images"][held]
    other_test = {**original, "test_images": 255 - original["test_images"]}
    finals, metrics, best = {}, {}, {}
    for name, arrays, extra in (("original", original, {}),
                                ("validation", other_validation, {}),
                                ("test", other_test, {"report.epoch_test_metrics": True})):
        data.write_files(tmp_path / name / "data", arrays)
        config = tiny_config(tmp_path / name / "data", **{"train.num_epochs": 3, **extra})
        finals[name] = train.train_and_evaluate(config, str(tmp_path / name / "run")).params
        metrics[name] = read_metrics(tmp_path / name / "run")
        best[name] = runs.load_checkpoint(tmp_path / name / "run", "best").step
    assert params_equal(finals["validation"], finals["original"])
    assert untimed(metrics["validation"], ("train",)) == untimed(metrics["original"], ("train",))
    assert params_equal(finals["test"], finals["original"])
    assert untimed(metrics["test"]) == untimed(metrics["original"])
    assert best["test"] == best["original"]
    tests = [r for r in metrics["test"] if r["split"] == "test"]
    assert [r["epoch"] for r in tests] == [1, 2, 3]  # logged when asked, used for nothing
    assert not any(r["split"] == "test" for r in metrics["original"])


def test_every_session_of_a_run_records_its_provenance(make_config, tmp_path):
    from fvae import provenance
    train.train_and_evaluate(make_config(**{"train.num_epochs": 1}), str(tmp_path))
    train.train_and_evaluate(make_config(**{"train.num_epochs": 2}), str(tmp_path))  # extended
    sessions = provenance.read(tmp_path)
    assert [s["start_step"] for s in sessions] == [0, 8]
    assert sessions[-1]["machine"]["runtime"]["eval_batch_size"] == 48
    assert sessions[-1]["versions"]["jax"] == jax.__version__
