"""fvae as a user installs it: the wheel, in a fresh virtualenv, run from outside the
repository, finds its packaged configs and trains a step with the console script."""

import json
import os
import pathlib
import subprocess
import sys
import venv
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--disable-pip-version-check", "-w", str(out), str(ROOT)], check=True)
    [path] = out.glob("fvae-*.whl")
    return path


def test_the_wheel_holds_the_package_its_configs_and_no_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("fvae/launch.py", "fvae/experiments/sharp_bce.py",
                 "fvae/experiments/study.py", "fvae/cpu/csrc/conv3x3.cc"):
        assert name in names, name
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in ("fvae-train", "fvae-sweep", "fvae-compare", "fvae-bench", "fvae-results"):
        assert f"{script} = " in text, script
    assert not [n for n in names if n.endswith((".gz", ".ckpt", ".so"))]


def test_installed_wheel_trains_a_packaged_config_from_outside_the_repo(wheel, tmp_path,
                                                                       tiny_data_dir):
    env_dir = tmp_path / "venv"
    # The libraries come from this interpreter (no network at test time); fvae itself
    # only from the wheel, which the fresh environment's own site-packages put first.
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                    "--quiet", "--no-deps", "--disable-pip-version-check", str(wheel)],
                   check=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import fvae, fvae.experiments as e; "
                            "print(fvae.__file__); print(e.__file__)"], cwd=outside,
                           capture_output=True, text=True, check=True, env=environ).stdout
    assert str(env_dir) in where and str(ROOT) not in where, where
    workdir = tmp_path / "run"
    tiny = [f"--config.data.dir={tiny_data_dir}", "--config.data.download=False",
            "--config.data.verify_checksums=False", "--config.data.validation_size=64",
            "--config.model.latent_dim=2", "--config.train.batch_size=32",
            "--config.train.num_steps=2", "--config.loss.beta_schedule=constant",
            "--config.report.progress_bar=False",
            "--config.report.num_figure_images=0", "--config.logging.writers=()",
            "--config.runtime.eval_batch_size=64", "--config.runtime.huge_pages=False"]
    result = subprocess.run([str(env_dir / "bin" / "fvae-train"), "--config", "sharp_bce",
                             "--workdir", str(workdir), *tiny], cwd=outside,
                            capture_output=True, text=True, env=environ, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((workdir / "config.json").read_text())
    assert (config["name"], config["loss"]["beta"]) == ("sharp_bce", 0.01)
    assert any(json.loads(line)["split"] == "validation"
               for line in (workdir / "metrics.jsonl").read_text().splitlines())
    missing = subprocess.run([str(env_dir / "bin" / "fvae-train"), "--config", "no_such",
                              "--workdir", str(workdir)], cwd=outside, capture_output=True,
                             text=True, env=environ)
    assert missing.returncode != 0 and "sharp_bce" in missing.stderr
    assert "Traceback" not in missing.stderr
