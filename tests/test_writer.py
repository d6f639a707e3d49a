"""The run's metric writers: metrics.jsonl never loses a line or crashes on one, and
the trackers (TensorBoard, wandb offline, MLflow on a local directory) get the records."""

import json

import numpy as np
import pytest

from fvae import configs, writer


def config_with(writers, **logging):
    config = configs.get_base_config()
    config.name = "tracked"
    config.logging.writers = writers
    for key, value in logging.items():
        config.logging[key] = value
    return config


RECORDS = [{"split": "train", "epoch": 1, "step": 8, "wall_time": 1.0, "loss": 3.5, "kl": 1.25},
           {"split": "validation", "epoch": 1, "step": 8, "wall_time": 1.0, "elbo": 4.5}]


def test_a_damaged_line_is_skipped_with_a_warning_and_a_copy(tmp_path, caplog):
    lines = [json.dumps(RECORDS[0]), "{not json", "42", json.dumps(RECORDS[1]), '{"torn']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    assert writer.read_metrics(tmp_path) == RECORDS  # nothing raised on `42`
    warned = [r.getMessage() for r in caplog.records]
    assert sum("is not a JSON object" in m for m in warned) == 2  # not the torn last line
    assert (tmp_path / "metrics.damaged.jsonl").read_text() == "\n".join(lines)
    with writer.open_run_log(tmp_path, config_with(()), resume_step=8) as log:  # resume
        log.write({**RECORDS[0], "epoch": 2, "step": 16})
    assert [r["step"] for r in writer.read_metrics(tmp_path)] == [8, 8, 16]
    assert (tmp_path / "metrics.damaged.jsonl").read_text() == "\n".join(lines)  # kept


def test_scalars_of_a_record_are_its_numbers_by_split():
    assert writer.scalars_of({**RECORDS[0], "skipped": 0, "flag": True, "note": "x"}) == \
        {"train/loss": 3.5, "train/kl": 1.25, "train/skipped": 0.0}


def test_wandb_offline_gets_scalars_images_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with writer.open_run_log(tmp_path, config_with(("wandb",), wandb_mode="offline")) as log:
        for record in RECORDS:
            log.write(record)
        log.add_images("validation/samples", np.full((4, 28, 28), 0.5), 8, ncols=2)
        run = log.writers[1]._run
        assert run.config["loss.beta"] == 1.0 and run.config["name"] == "tracked"
        assert run.id == writer.run_id(tmp_path)
    history = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(history) == 1 and history[0].stat().st_size > 0
    assert len(writer.read_metrics(tmp_path)) == 2  # metrics.jsonl as ever


def test_mlflow_local_run_gets_metrics_and_resumes_into_the_same_run(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    uri = (tmp_path / "mlruns").as_uri()
    config = config_with(("mlflow",), mlflow_tracking_uri=uri)
    with writer.open_run_log(tmp_path / "run", config) as log:
        log.write(RECORDS[0])
    with writer.open_run_log(tmp_path / "run", config, resume_step=8) as log:
        log.write({**RECORDS[0], "epoch": 2, "step": 16, "loss": 2.5})
        log.add_images("validation/samples", np.full((4, 28, 28), 0.5), 16, ncols=2)
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("fvae").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train.loss")] \
        == [(8, 3.5), (16, 2.5)]
    assert run.data.params["loss.beta"] == "1.0" and run.info.run_name == "tracked"


def test_writers_are_checked_before_any_work(monkeypatch):
    config = config_with(("tensorboard", "neptune"))
    with pytest.raises(configs.ConfigError, match="logging.writers"):
        configs.validate(config)
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(configs.ConfigError, match=r'pip install "fvae\[wandb\]"'):
        configs.validate(config_with(("wandb",)))


def test_trackers_are_imported_only_when_named(tmp_path):
    import subprocess
    import sys
    code = ("import sys; from fvae import configs, writer; c = configs.get_base_config(); "
            f"writer.open_run_log({str(tmp_path)!r}, c).close(); "
            "print([m for m in ('wandb', 'mlflow') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_an_earlier_runs_tensorboard_switch_reads_as_writers():
    saved = configs.get_base_config().to_dict()
    del saved["logging"]
    saved["report"]["tensorboard"] = False
    assert configs.from_dict(saved).logging.writers == ()
    saved["report"]["tensorboard"] = True
    assert configs.from_dict(saved).logging.writers == ("tensorboard",)
