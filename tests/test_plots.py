"""Per-run figures from a tiny trained run (latent 2 and the PCA path at latent 3),
their latent-space geometry against closed forms, and TensorBoard event files."""

import functools
import json
import math
import pathlib
import shutil
import statistics
import struct

import jax
import matplotlib.pyplot as plt
import numpy as np
import pytest

from conftest import tiny_config
from fvae import checkpoint, configs, data, losses, models, plots, train
from fvae.runs import load_checkpoint, write_run_figures
from fvae.writer import open_run_log, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_FIGURES = {"reconstructions.png", "samples.png", "interpolations.png",
               "kl_per_dimension.png", "latent_manifold.png", "latent_scatter.png",
               "loss_curves.png"}
GRID = 6


@pytest.fixture(scope="module")
def runs(tiny_data_dir, tmp_path_factory):
    """{latent_dim: workdir} of two tiny trained runs, shared by this module."""
    root = tmp_path_factory.mktemp("plot_runs")
    workdirs = {}
    for latent in (2, 3):
        workdirs[latent] = root / f"z{latent}"
        train.train_and_evaluate(tiny_config(tiny_data_dir, **{"model.latent_dim": latent}),
                                 str(workdirs[latent]))
    return workdirs


@pytest.fixture
def captured(monkeypatch):
    """{file name: Figure} of every figure plots saves during a test."""
    figures, save = {}, plots.save_figure

    def capture(fig, path):
        figures[pathlib.Path(path).name] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "save_figure", capture)
    return figures


def assert_png(path: pathlib.Path, min_size: int = 200) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    height, width = plt.imread(path).shape[:2]
    assert height > min_size and width > min_size, (path, height, width)


@pytest.mark.parametrize("latent", [2, 3])
def test_write_run_figures(runs, latent, captured):
    workdir = runs[latent]
    paths = write_run_figures(workdir, grid_size=GRID)
    assert {p.name for p in paths} == RUN_FIGURES
    for path in paths:
        assert path.parent == workdir / "figures"
        assert_png(path)

    manifold = captured["latent_manifold.png"].axes[0]
    assert manifold.images[0].get_array().shape == (GRID * 28, GRID * 28)
    expected_labels = ("z1", "z2") if latent == 2 else ("PC1", "PC2")
    assert manifold.get_xlabel().startswith(expected_labels[0])
    assert manifold.get_ylabel().startswith(expected_labels[1])

    scatter = captured["latent_scatter.png"].axes[0]
    legend = [t.get_text() for t in scatter.get_legend().get_texts()]
    assert legend == list(data.CLASS_NAMES)
    assert sum(len(c.get_offsets()) for c in scatter.collections) == 64  # all test images
    assert scatter.get_xlabel().startswith(expected_labels[0])

    kl_axes = captured["kl_per_dimension.png"].axes[0]
    config, model, params = load_checkpoint(workdir, "best")[:3]
    mean, logvar = models.encode(model, params, data.load(config).test_images)
    kl, _ = plots.latent_statistics(mean, logvar)
    np.testing.assert_allclose([bar.get_height() for bar in kl_axes.patches], kl, rtol=1e-4)
    assert kl_axes.get_title().endswith(f"of {latent} active)")
    interpolations = captured["interpolations.png"].axes[0].images[0].get_array()
    assert interpolations.shape == (5 * 28, 12 * 28)  # 5 pairs, A + 10 steps + B


def test_scatter_is_capped_and_keeps_every_class(runs, captured, tmp_path):
    config, model, params = load_checkpoint(runs[3], "best")[:3]
    dataset = data.load(config)
    plots.write_figures(model, params, config, dataset, tmp_path, jax.random.key(0),
                        max_points=20, grid_size=3, num_pairs=2, num_steps=4)
    scatter = captured["latent_scatter.png"].axes[0]
    assert sum(len(c.get_offsets()) for c in scatter.collections) == 20
    assert len(scatter.get_legend().get_texts()) == 10
    assert captured["interpolations.png"].axes[0].images[0].get_array().shape == \
        (2 * 28, 6 * 28)


def test_the_figures_hand_their_grids_to_tensorboard_computed_once(runs, captured, tmp_path):
    """add_images gets the reconstruction and sample grids the PNGs show: the test
    images, their reconstructions through the posterior mean, and prior samples."""
    config, model, params = load_checkpoint(runs[3], "best")[:3]
    dataset, got = data.load(config), {}
    plots.write_figures(model, params, config, dataset, tmp_path, jax.random.key(0),
                        num_images=4, grid_size=3, num_pairs=1, num_steps=3,
                        add_images=lambda tag, images, ncols=8: got.update({tag: (images, ncols)}))
    assert set(got) == {"test/reconstructions", "prior/samples"}
    mean_fn = functools.partial(losses.pixel_mean, loss_config=config.loss)
    images, ncols = got["test/reconstructions"]
    recons = models.reconstruct(model, params, dataset.test_images[:4], mean_fn=mean_fn)
    assert ncols == 4 and images.shape == (8, 28, 28)
    np.testing.assert_allclose(images[:4], dataset.test_images[:4] / 255.0)
    np.testing.assert_allclose(images[4:], np.asarray(recons).reshape(4, 28, 28), atol=1e-5)
    samples = models.sample(model, params, jax.random.key(0), 4, config.model.latent_dim,
                            mean_fn)
    np.testing.assert_allclose(got["prior/samples"][0], np.asarray(samples).reshape(4, 28, 28),
                               atol=1e-6)


def test_one_dimensional_latents_skip_the_plane_figures(tiny_data_dir, tmp_path):
    config = tiny_config(tiny_data_dir, **{"model.latent_dim": 1})
    model = models.build_model(config.model)
    params = models.init_params(model, jax.random.key(0))
    paths = plots.write_figures(model, params, config, data.load(config), tmp_path,
                                jax.random.key(1), num_pairs=1, num_steps=3)
    assert {p.name for p in paths} == RUN_FIGURES - {"latent_manifold.png",
                                                     "latent_scatter.png", "loss_curves.png"}


def test_data_dir_override(runs, tiny_data_dir, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(tiny_data_dir, moved)
    paths = write_run_figures(runs[2], which="latest", data_dir=moved, grid_size=3)
    assert len(paths) == len(RUN_FIGURES)
    with pytest.raises(data.DataError, match="nowhere"):
        write_run_figures(runs[2], data_dir=tmp_path / "nowhere")


def test_loss_curves_need_only_metrics(runs, tmp_path, captured):
    shutil.copy(runs[2] / "metrics.jsonl", tmp_path / "metrics.jsonl")
    path = plots.loss_curves(tmp_path, tmp_path / "curves.png")
    assert_png(path)
    panels = captured["curves.png"].axes
    assert [ax.get_title() for ax in panels[:3]] == ["loss (recon + β·KL)", "recon", "KL (nats)"]
    epochs = [r["epoch"] for r in read_metrics(tmp_path) if r["split"] == "validation"]
    for ax in panels[:3]:
        assert [list(line.get_xdata()) for line in ax.lines] == [epochs, epochs]
    assert panels[3].get_ylabel() == "β"  # the twin axis of the KL panel
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plots.loss_curves(tmp_path / "empty", tmp_path / "x.png")


def test_principal_plane_recovers_known_axes():
    rng = np.random.default_rng(0)
    stds = np.array([0.3, 3.0, 0.1, 1.5, 0.2])
    rotation, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    means = 7.0 + (rng.normal(size=(20000, 5)) * stds) @ rotation.T
    plane = plots.principal_plane(means)
    np.testing.assert_allclose(plane.directions @ plane.directions.T, np.eye(2), atol=1e-10)
    assert abs(plane.directions[0] @ rotation[:, 1]) > 0.999  # the std-3 axis
    assert abs(plane.directions[1] @ rotation[:, 3]) > 0.999  # the std-1.5 axis
    np.testing.assert_allclose(plane.scales, [3.0, 1.5], rtol=0.03)
    np.testing.assert_allclose(plane.center, 7.0, atol=0.05)
    np.testing.assert_allclose(plane.project(plane.center[None]), 0.0, atol=1e-12)
    share = 9 / (9 + 2.25 + 0.09 + 0.04 + 0.01)
    assert plane.axis_labels[0] == f"PC1 ({share:.0%} of variance)"


def test_principal_plane_of_2d_latents_is_the_prior_plane():
    plane = plots.principal_plane(np.random.default_rng(0).normal(3.0, 2.0, (50, 2)))
    np.testing.assert_array_equal(plane.directions, np.eye(2))
    np.testing.assert_array_equal(plane.center, [0.0, 0.0])
    assert plane.axis_labels == ("z1", "z2")
    with pytest.raises(ValueError, match="latent_dim >= 2"):
        plots.principal_plane(np.zeros((5, 1)))


def test_manifold_grid_is_on_the_plane_at_gaussian_quantiles():
    plane = plots.principal_plane(np.random.default_rng(1).normal(size=(500, 4)) * [1, 2, 3, 4])
    z, coords = plots.manifold_latents(plane, 5)
    assert z.shape == (25, 4)
    quantiles = [statistics.NormalDist().inv_cdf(p) for p in (0.05, 0.275, 0.5, 0.725, 0.95)]
    np.testing.assert_allclose(coords, np.outer(plane.scales, quantiles), rtol=1e-6)
    projected = plane.project(z).reshape(5, 5, 2)
    np.testing.assert_allclose(projected[0, :, 0], coords[0], atol=1e-5)  # x across a row
    np.testing.assert_allclose(projected[:, 0, 1], coords[1][::-1], atol=1e-5)  # top row highest
    off_plane = (z - plane.center) - plane.project(z) @ plane.directions
    np.testing.assert_allclose(off_plane, 0.0, atol=1e-5)
    assert plots.normal_quantiles(3)[1] == 0.0


def test_latent_statistics_match_closed_form():
    rng = np.random.default_rng(0)
    mean = np.stack([rng.normal(0, 1.0, 1000), np.full(1000, 0.5), rng.normal(0, 0.05, 1000)], 1)
    logvar = np.log(np.stack([np.full(1000, 0.1), np.ones(1000), np.full(1000, 0.9)], 1))
    kl, variance = plots.latent_statistics(mean, logvar)
    by_hand = 0.5 * (np.exp(logvar) + mean ** 2 - 1 - logvar).mean(0)
    np.testing.assert_allclose(kl, by_hand, rtol=1e-6)
    np.testing.assert_allclose(kl.sum(), np.mean(losses.gaussian_kl(mean, logvar)), rtol=1e-5)
    np.testing.assert_array_equal(variance > plots.ACTIVE_UNIT_THRESHOLD, [True, False, False])


def test_interpolation_latents_run_from_start_to_end():
    start, end = np.zeros((2, 3)), np.ones((2, 3)) * [[1.0], [4.0]]
    z = plots.interpolation_latents(start, end, 5)
    assert z.shape == (2, 5, 3)
    np.testing.assert_allclose(z[:, 0], start)
    np.testing.assert_allclose(z[:, -1], end)
    np.testing.assert_allclose(z[1, 2], 2.0)


# ---- TensorBoard event files (fvae.writer) ----

def read_events(logdir: pathlib.Path) -> list:
    """Every event in the TFRecord event files of `logdir`, in file order."""
    from tensorboardX.proto import event_pb2
    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        raw, offset = path.read_bytes(), 0
        while offset < len(raw):
            (length,) = struct.unpack("<Q", raw[offset:offset + 8])
            offset += 12  # length and its crc
            events.append(event_pb2.Event.FromString(raw[offset:offset + length]))
            offset += length + 4  # payload and its crc
    return events


def scalars(events) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for event in events:
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def _logging(writers):
    config = configs.get_base_config()
    config.logging.writers = writers
    return config


TENSORBOARD, NO_TRACKERS = _logging(("tensorboard",)), _logging(())


def epoch_records(step: int) -> list[dict]:
    common = {"epoch": step // 8, "step": step, "wall_time": 1.0}
    return [{"split": "train", **common, "loss": 500.0 - step, "kl": 1.5, "skipped": 0},
            {"split": "test", **common, "loss": 480.0 - step, "elbo": float("nan"), "beta": 1.0}]


def test_tensorboard_scalars_match_metrics_jsonl(tmp_path):
    with open_run_log(tmp_path, TENSORBOARD) as writer:
        for step in (8, 16):
            for record in epoch_records(step):
                writer.write(record)
        writer.add_images("test/samples", np.linspace(0, 1, 5 * 784).reshape(5, 28, 28), 16,
                          ncols=3)
    events = read_events(tmp_path / "tensorboard")
    got = scalars(events)
    assert set(got) == {"train/loss", "train/kl", "train/skipped", "test/loss", "test/elbo",
                        "test/beta"}
    assert got["train/loss"] == [(8, 492.0), (16, 484.0)]
    assert got["test/loss"] == [(8, 472.0), (16, 464.0)]
    assert all(math.isnan(v) for _, v in got["test/elbo"])
    images = [(e.step, v.image) for e in events for v in e.summary.value if v.HasField("image")]
    assert [(step, im.height, im.width) for step, im in images] == [(16, 56, 84)]
    assert images[0][1].encoded_image_string[:8] == PNG_SIGNATURE
    assert [json.loads(line)["loss"] for line in
            (tmp_path / "metrics.jsonl").read_text().splitlines()] == [492, 472, 484, 464]


def test_tensorboard_resume_purges_and_fresh_run_restarts(tmp_path):
    with open_run_log(tmp_path, TENSORBOARD) as writer:
        for step in (8, 16):
            for record in epoch_records(step):
                writer.write(record)
    with open_run_log(tmp_path, TENSORBOARD, resume_step=8) as writer:
        for record in epoch_records(16):
            writer.write(record)
    events = read_events(tmp_path / "tensorboard")
    starts = [e.step for e in events if e.HasField("session_log")]
    assert starts == [9]  # TensorBoard hides the first run's events from step 9 on
    assert [r["step"] for r in read_metrics(tmp_path)] == [8, 8, 16, 16]

    with open_run_log(tmp_path, TENSORBOARD) as writer:  # a fresh start
        writer.write(epoch_records(8)[0])
    assert scalars(read_events(tmp_path / "tensorboard"))["train/loss"] == [(8, 492.0)]
    # the earlier logs are set aside beside the new ones, never deleted
    [old_log] = tmp_path.glob("metrics.*.jsonl")
    assert [r["step"] for r in map(json.loads, old_log.read_text().splitlines())] == \
        [8, 8, 16, 16]
    [old_events] = tmp_path.glob("tensorboard.*")
    assert scalars(read_events(old_events))["train/loss"][-1] == (16, 484.0)


def test_metrics_writer_without_tensorboard_is_unchanged(tmp_path):
    writer = open_run_log(tmp_path, NO_TRACKERS)
    writer.write(epoch_records(8)[0])
    writer.add_images("ignored", np.zeros((2, 28, 28)), 8)  # no-op without TensorBoard
    writer.close()
    assert not (tmp_path / "tensorboard").exists()
    assert read_metrics(tmp_path) == [{**epoch_records(8)[0]}]
