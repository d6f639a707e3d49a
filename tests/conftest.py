"""Shared fixtures: a tiny Fashion-MNIST-shaped IDX dataset and a tiny config."""

import pathlib

import jax
import numpy as np
import pytest

from fvae import configs, cpu, data

# As launch.py does before any JAX computation, so that in-process runs compute exactly
# what launch.py subprocesses do (some tests compare the two bit for bit).
cpu.configure_cpu_convolutions(configs.get_base_config().runtime.cpu_convolutions)


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-dependent rectangles with noise: structured enough for a loss to fall."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for image, label in zip(images, labels):
        top, left = 2 + (label % 5) * 4, 2 + (label // 5) * 10
        image[top:top + 8, left:left + 14] = 220
    return images, labels


def write_dataset(directory: pathlib.Path, n_train: int = 320, n_test: int = 64) -> dict:
    """Writes the four IDX .gz files; returns {filename: md5} for them."""
    arrays = dict(zip(("train_images", "train_labels"), make_images(n_train, 0)))
    arrays.update(zip(("test_images", "test_labels"), make_images(n_test, 1)))
    data.write_files(directory, arrays)
    return {filename: data.md5sum(directory / filename) for filename, _ in data.FILES.values()}


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("fashion_mnist")
    write_dataset(directory)
    return directory


def tiny_config(data_dir, **overrides):
    """A small conv VAE on the tiny dataset: a few seconds per run on a CPU."""
    c = configs.get_base_config()
    c.name = "tiny"
    c.data.dir = str(data_dir)
    c.data.download = False
    c.data.verify_checksums = False  # the test files are not the published ones
    c.data.validation_size = 64  # of the 320 training images: 256 remain to train on
    c.model.latent_dim = 2
    c.model.encoder_widths = (4, 8, 8)
    c.model.encoder_dense = 16
    c.model.decoder_widths = (8, 8, 4)
    c.model.num_res_blocks = 1
    c.train.batch_size = 32
    c.train.num_epochs = 2
    c.runtime.eval_batch_size = 48  # does not divide 64: exercises the masked last batch
    c.report.progress_bar = False
    c.report.num_figure_images = 0  # no figures at the end (~5 s a run); tests that
    # check them ask for 4
    for key, value in overrides.items():
        configs.set_key(c, key, value)
    return c


@pytest.fixture
def make_config(tiny_data_dir):
    return lambda **overrides: tiny_config(tiny_data_dir, **overrides)


def write_experiment(path: pathlib.Path, data_dir, **overrides) -> pathlib.Path:
    """An experiment file whose get_config() is tiny_config(data_dir, **overrides), for
    code that takes a config file (launch.py in a subprocess, fvae.sweep)."""
    tests = pathlib.Path(__file__).parent
    path.write_text(
        f"import sys\nsys.path.insert(0, {str(tests)!r})\n"
        "from conftest import tiny_config\n\n"
        f"def get_config():\n    return tiny_config({str(data_dir)!r}, **{overrides!r})\n")
    return path


def params_equal(a, b) -> bool:
    """Whether two parameter trees are bit-for-bit equal."""
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def assert_params_close(a, b, rtol=2e-4, atol=2e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def loss_config(likelihood="bce", reduction="sum", **overrides):
    """The base config's loss block with these values."""
    c = configs.get_base_config().loss
    c.likelihood, c.reduction = likelihood, reduction
    for key, value in overrides.items():
        c[key] = value
    return c
