import pathlib

import pytest
from fvae import configs, train

# Every experiment file but the sweep configs (tested in test_sweep.py).
EXPERIMENTS = sorted(p for p in (pathlib.Path(__file__).parent.parent / "experiments").glob("*.py")
                     if p.stem not in ("ablation", "study") and not p.stem.startswith("_"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_is_valid(path):
    config = configs.load_config_file(path)
    configs.validate(config)
    assert config.name == path.stem


@pytest.mark.parametrize("key,value,match", [
    ("loss.likelihood", "laplace", "loss.likelihood"),
    ("loss.beta", -0.1, "loss.beta"),
    ("model.latent_dim", 0, "model.latent_dim"),
    ("model.name", "resnet", "model.name"),
    ("optim.learning_rate", 0.0, "optim.learning_rate"),
    ("loss.reduction", "mean", "loss.reduction"),  # mean-reduced BCE is not a likelihood
    ("train.batch_size", 0, "train.batch_size"),
    ("loss.beta", float("nan"), "loss.beta=nan.*finite"),  # NaN fails no comparison
    ("optim.learning_rate", float("inf"), "optim.learning_rate=inf"),
    ("model.encoder_widths", (32, 64.5, 128), "model.encoder_widths"),
    ("model.encoder_strides", (2, 2.0, 1), "model.encoder_strides"),
])
def test_bad_values_name_the_key(key, value, match):
    config = configs.get_base_config()
    section, field = key.split(".")
    config[section][field] = value
    with pytest.raises(configs.ConfigError, match=match):
        configs.validate(config)


def test_unknown_keys_fail():
    config = configs.get_base_config()
    with pytest.raises(AttributeError, match="latent_dims"):
        config.model.latent_dims = 3  # locked: a typo cannot add a key
    unlocked = configs.get_base_config().unlock()
    unlocked.model.latent_dims = 3
    with pytest.raises(configs.ConfigError, match="model.latent_dims"):
        configs.validate(unlocked)


def test_a_moved_key_names_where_it_went():
    unlocked = configs.get_base_config().unlock()
    unlocked.train.cpu_conv3x3 = "xla"
    with pytest.raises(configs.ConfigError, match="train.cpu_conv3x3 is now runtime.cpu_conv3x3"):
        configs.validate(unlocked)
    with pytest.raises(configs.ConfigError, match="train.progress_bar is now report.progress_bar"):
        configs.check_override_flags(["launch.py", "--config", "x.py",
                                      "--config.train.progress_bar=False"])
    with pytest.raises(configs.ConfigError, match="train.tensorboard is now logging.writers"):
        configs.check_override_flags(["launch.py", "--noconfig.train.tensorboard"])
    configs.check_override_flags(["launch.py", "--config.report.progress_bar", "False",
                                  "--config.model.encoder_widths=(8,16,16)"])
    assert set(configs.MOVED_KEYS.values()) <= set(configs.flatten(configs.get_base_config()))


def test_resumable_keys_follow_from_their_blocks():
    """Every key of the runtime, report, logging, checkpoint and eval blocks may change on
    resume; of the rest only the name and where the data is read from."""
    keys = configs.flatten(configs.get_base_config())
    resumable = {k for k in keys if configs.is_resumable(k)}
    blocks = {k for k in keys if k.split(".")[0] in ("runtime", "report", "logging",
                                                     "checkpoint", "eval")}
    assert resumable == blocks | {"name", "data.dir", "data.download", "data.verify_checksums",
                                  "train.on_nonfinite", "train.max_skipped_fraction"}
    assert not configs.is_resumable("train.batch_size") and not configs.is_resumable("seed")


def test_batch_larger_than_data_fails_before_training(make_config, tmp_path):
    config = make_config(**{"train.batch_size": 512})  # the tiny set has 256 images
    with pytest.raises(configs.ConfigError, match="train.batch_size"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("overrides,match", [
    ({"loss.beta_schedule": "linear", "loss.warmup_steps": 100}, "loss.warmup_steps=100.*1 to 15"),
    ({"loss.beta_schedule": "linear", "loss.warmup_steps": 16}, "warmup_steps=16"),  # never there
    ({"loss.beta_schedule": "linear", "loss.warmup_epochs": 0.01}, "warmup_epochs=0.01.*not 0"),
    ({"optim.lr_schedule": "warmup_cosine", "optim.lr_warmup_steps": 16}, "lr_warmup_steps=16"),
    ({"loss.beta_schedule": "cyclical", "train.num_steps": 7}, "cycle_steps=0.*give 1"),
    ({"loss.beta_schedule": "cyclical", "loss.cycle_steps": 1}, "cycle_steps=1"),
])
def test_warm_ups_must_fit_the_run(make_config, tmp_path, overrides, match):
    """A beta warm-up longer than the run ends below loss.beta, one that rounds to no
    steps is no warm-up: either would be reported as what the config says."""
    config = make_config(**{"train.num_epochs": 2, **overrides})  # 2 x 8 steps
    with pytest.raises(configs.ConfigError, match=match):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_saved_configs_gain_new_keys_at_their_defaults():
    import json
    saved = json.loads(configs.get_base_config().to_json())
    del saved["model"]["upsample"]  # a run saved before this key existed
    saved["model"]["latent_dim"] = 7
    config = configs.from_dict(saved)
    assert config.model.upsample == "subpixel" and config.model.latent_dim == 7
    assert config.model.encoder_widths == (32, 64, 128)  # JSON lists become tuples again
    configs.validate(config)
    saved["model"]["flavour"] = "new"
    with pytest.raises(configs.ConfigError, match="model.flavour"):
        configs.from_dict(saved)


def test_a_config_saved_by_an_earlier_fvae_reads_with_its_keys_moved():
    """config.json of a run from before the runtime and report blocks (fvae.compare
    reads old workdirs)."""
    import json
    saved = json.loads(configs.get_base_config().to_json())
    del saved["runtime"], saved["report"]
    saved["train"].update(cpu_devices=2, progress_bar=False, eval_batch_size=500)
    config = configs.from_dict(saved)
    assert (config.runtime.cpu_devices, config.report.progress_bar,
            config.runtime.eval_batch_size) == (2, False, 500)
    configs.validate(config)


def test_a_config_is_validated_once(make_config, tmp_path, monkeypatch):
    calls = []
    original = configs._validate_loss
    monkeypatch.setattr(configs, "_validate_loss", lambda c: calls.append(1) or original(c))
    config = configs.validate(make_config())
    train.check_group([config], [tmp_path / "run"])  # what train calls first
    assert len(calls) == 1  # launch.py validated it; train did not again
    config.loss.beta = -1.0  # changed after validating: checked again, before any work
    with pytest.raises(configs.ConfigError, match="loss.beta"):
        train.check_group([config], [tmp_path / "run"])
    fresh = make_config()  # a library caller's config, never validated
    fresh.optim.learning_rate = 0.0
    with pytest.raises(configs.ConfigError, match="optim.learning_rate"):
        train.check_group([fresh], [tmp_path / "run"])
