"""Figures a run leaves in workdir/figures/ (matplotlib, no display needed).

`write_figures` draws all of them from parameters in memory (fvae.runs.write_run_figures
from a workdir's checkpoint); `loss_curves` needs only metrics.jsonl. Images
are always the likelihood's pixel means (`losses.pixel_mean`), never raw logits.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
import statistics
from typing import Callable

import jax
import matplotlib
import ml_collections

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.patches  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from fvae import evaluate, losses, models  # noqa: E402
from fvae.batching import map_batches  # noqa: E402
from fvae.images import tile  # noqa: E402
from fvae.evaluate import ACTIVE_UNIT_THRESHOLD  # noqa: E402
from fvae.data import CLASS_NAMES  # noqa: E402
from fvae.writer import read_metrics, series  # noqa: E402


def save_figure(fig, path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def reconstruction_grid(originals: np.ndarray, reconstructions: np.ndarray,
                        path: str | os.PathLike, title: str = "") -> pathlib.Path:
    """Test images (top row) above their reconstructions (bottom row)."""
    n = len(originals)
    rows = np.concatenate([np.asarray(originals, np.float32).reshape(n, 28, 28),
                           np.asarray(reconstructions, np.float32).reshape(n, 28, 28)])
    cell, title_height = 0.8, 0.5
    fig, ax = plt.subplots(figsize=(n * cell, 2 * cell + title_height))
    ax.set_position([0, 0, 1, 2 * cell / (2 * cell + title_height)])  # labels spill left
    ax.imshow(tile(rows, n), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([13.5, 41.5], ["test images", "reconstructions"])
    ax.tick_params(axis="y", length=0)
    ax.set_title(title or "Reconstructions (pixel means)")
    return save_figure(fig, path)


def sample_grid(samples: np.ndarray, path: str | os.PathLike, title: str = "",
                ncols: int = 8) -> pathlib.Path:
    """Pixel means of images decoded from prior samples."""
    ncols = max(1, min(ncols, len(samples)))
    rows, cell, title_height = max(1, -(-len(samples) // ncols)), 0.9, 0.5
    fig, ax = plt.subplots(figsize=(ncols * cell, rows * cell + title_height))
    ax.set_position([0, 0, 1, rows * cell / (rows * cell + title_height)])  # no margins
    ax.imshow(tile(samples, ncols), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title or "Samples from the prior (pixel means)")
    return save_figure(fig, path)


# ---- latent-space computations (numpy; the figures below only draw them) ----



@dataclasses.dataclass(frozen=True)
class LatentPlane:
    """A 2-D view of latent space: z = center + sum_k coord_k * directions[k].

    `scales` is the spread along each direction (1 for the prior's axes, the standard
    deviation of the posterior means along a principal direction), so a grid of
    Gaussian quantiles times `scales` covers where the codes actually lie.
    """
    center: np.ndarray  # [D]
    directions: np.ndarray  # [2, D], orthonormal rows
    scales: np.ndarray  # [2]
    axis_labels: tuple[str, str]

    def project(self, z: np.ndarray) -> np.ndarray:
        """Coordinates [N, 2] of latents [N, D] in this plane."""
        return (np.asarray(z) - self.center) @ self.directions.T


def principal_plane(means: np.ndarray) -> LatentPlane:
    """The plane of the two leading principal directions of posterior means [N, D].

    For D == 2 it is the latent space itself (z1, z2 around 0, unit scales), so the
    manifold is drawn at the prior's quantiles as in Kingma & Welling (2014).
    """
    means = np.asarray(means, np.float64)
    dim = means.shape[1]
    if dim < 2:
        raise ValueError(f"a latent plane needs latent_dim >= 2, got {dim}; the manifold "
                         "and scatter figures are skipped for 1-D latents.")
    if dim == 2:
        return LatentPlane(np.zeros(2), np.eye(2), np.ones(2), ("z1", "z2"))
    center = means.mean(0)
    _, singular, vt = np.linalg.svd(means - center, full_matrices=False)
    directions = vt[:2] * np.sign(vt[:2, [0]] + (vt[:2, [0]] == 0))  # deterministic sign
    scales = singular[:2] / np.sqrt(max(1, len(means) - 1))
    share = singular[:2] ** 2 / max(np.sum(singular ** 2), 1e-30)
    labels = tuple(f"PC{k + 1} ({share[k]:.0%} of variance)" for k in range(2))
    return LatentPlane(center, directions, scales, labels)


def normal_quantiles(num: int, low: float = 0.05, high: float = 0.95) -> np.ndarray:
    """`num` standard-normal quantiles at probabilities evenly spaced in [low, high]."""
    inv_cdf = statistics.NormalDist().inv_cdf
    return np.array([inv_cdf(p) for p in np.linspace(low, high, num)]).round(12) + 0.0


def manifold_latents(plane: LatentPlane, grid_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Latents [grid_size**2, D] on a grid of quantiles in `plane`, row-major with the
    second coordinate decreasing down the rows (as on a plot); and the coordinates
    along each axis [2, grid_size]."""
    coords = normal_quantiles(grid_size)[None, :] * plane.scales[:, None]
    c1, c2 = np.meshgrid(coords[0], coords[1][::-1])
    z = plane.center + c1.reshape(-1, 1) * plane.directions[0] \
        + c2.reshape(-1, 1) * plane.directions[1]
    return z.astype(np.float32), coords


def latent_statistics(mean: np.ndarray, logvar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(KL per dimension averaged over images, variance over images of the posterior
    mean) for posteriors [N, D]; a dimension is active when the variance exceeds
    ACTIVE_UNIT_THRESHOLD (fvae.evaluate's definitions)."""
    return evaluate.kl_per_dim(mean, logvar), np.var(np.float64(mean), axis=0)


def interpolation_latents(start: np.ndarray, end: np.ndarray, num_steps: int) -> np.ndarray:
    """Straight lines from each start [P, D] to its end [P, D]: [P, num_steps, D]."""
    t = np.linspace(0.0, 1.0, num_steps)[None, :, None]
    return ((1 - t) * start[:, None] + t * end[:, None]).astype(np.float32)


# ---- figures of latent space and training ----

def _pixel_ticks(ax, axis: str, coords: np.ndarray, max_ticks: int = 7) -> None:
    """Ticks at the centres of 28-px cells, labelled with each cell's coordinate."""
    idx = np.unique(np.linspace(0, len(coords) - 1, min(max_ticks, len(coords))).round()
                    .astype(int))
    centres = idx * 28 + 13.5
    labels = [f"{c:.2g}" for c in coords[idx]]
    if axis == "x":
        ax.set_xticks(centres, labels)
    else:
        ax.set_yticks(centres, labels)


def latent_manifold(images: np.ndarray, coords: np.ndarray, plane: LatentPlane,
                    path: str | os.PathLike, title: str = "") -> pathlib.Path:
    """Decoded images [g*g, 28, 28] of `manifold_latents`, on axes labelled with the
    latent coordinates of each cell."""
    grid = coords.shape[1]
    fig, ax = plt.subplots(figsize=(max(5.0, grid * 0.45), max(5.0, grid * 0.45)))
    ax.imshow(tile(images, grid), cmap="gray", vmin=0, vmax=1)
    _pixel_ticks(ax, "x", coords[0])
    _pixel_ticks(ax, "y", coords[1][::-1])
    ax.set_xlabel(plane.axis_labels[0])
    ax.set_ylabel(plane.axis_labels[1])
    ax.set_title(title or "Latent manifold (pixel means at Gaussian quantiles)")
    return save_figure(fig, path)


def latent_scatter(points: np.ndarray, labels: np.ndarray, plane: LatentPlane,
                   path: str | os.PathLike, title: str = "") -> pathlib.Path:
    """Points [N, 2] in `plane` coloured by class, with every class in the legend."""
    fig, ax = plt.subplots(figsize=(7, 5.5))
    colors = plt.get_cmap("tab10")
    size = 12 if len(points) <= 1000 else 4
    for k, name in enumerate(CLASS_NAMES):
        members = points[np.asarray(labels) == k]
        ax.scatter(members[:, 0], members[:, 1], s=size, color=colors(k), alpha=0.7,
                   linewidths=0, label=name)
    ax.set_xlabel(plane.axis_labels[0])
    ax.set_ylabel(plane.axis_labels[1])
    ax.legend(title="class", loc="upper left", bbox_to_anchor=(1.01, 1.0),
              markerscale=2.5 if size < 12 else 1.5, frameon=False)
    ax.set_title(title or f"Test posterior means ({len(points)} images)")
    return save_figure(fig, path)


def interpolation_grid(originals: np.ndarray, decoded: np.ndarray,
                       path: str | os.PathLike, title: str = "") -> pathlib.Path:
    """Rows of [image A, decoded path from A to B, image B]: originals [P, 2, 28, 28],
    decoded [P, S, 28, 28] pixel means."""
    pairs, steps = decoded.shape[:2]
    originals = np.asarray(originals, np.float32).reshape(pairs, 2, 28, 28)
    rows = np.concatenate([originals[:, :1], np.asarray(decoded).reshape(pairs, steps, 28, 28),
                           originals[:, 1:]], axis=1)
    fig, ax = plt.subplots(figsize=(max(5.0, (steps + 2) * 0.6), pairs * 0.6 + 0.9))
    ax.imshow(tile(rows.reshape(-1, 28, 28), steps + 2), cmap="gray", vmin=0, vmax=1)
    labels = ["A"] + [f"{t:.2g}" for t in np.linspace(0, 1, steps)] + ["B"]
    ax.set_xticks(np.arange(steps + 2) * 28 + 13.5, labels, fontsize=8)
    ax.set_yticks([])
    ax.set_xlabel("test image A, decoded z = (1 - t) mean(A) + t mean(B) for t above, "
                  "test image B")
    ax.set_title(title or "Interpolations between posterior means")
    return save_figure(fig, path)


def kl_per_dimension(kl: np.ndarray, mean_variance: np.ndarray,
                     path: str | os.PathLike, title: str = "") -> pathlib.Path:
    """Bar chart of KL per latent dimension, active units coloured (Burda et al.);
    the title ends with the number of active units."""
    active = np.asarray(mean_variance) > ACTIVE_UNIT_THRESHOLD
    dims = np.arange(1, len(kl) + 1)
    fig, ax = plt.subplots(figsize=(max(5.0, len(kl) * 0.22), 3.5))
    colors = ("C0", "0.7")
    ax.bar(dims, kl, color=np.where(active, *colors))
    ax.set_xlabel("latent dimension")
    ax.set_ylabel("KL (nats per image)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend([matplotlib.patches.Patch(color=c) for c in colors],
              [f"active: Var[mean] > {ACTIVE_UNIT_THRESHOLD}", "inactive"], frameon=False)
    ax.set_title(f"{title or 'KL per latent dimension'} ({active.sum()} of {len(kl)} active)")
    return save_figure(fig, path)


def iwae_vs_k(by_k: list[dict], path: str | os.PathLike, title: str = "") -> pathlib.Path:
    """The IWAE bound (-log p(x), nats per image) against the number of draws K, from
    one set of draws (eval.json's `iwae_by_k`), with its standard error over images:
    whether the bound has levelled off at the K used."""
    ks = [row["k"] for row in by_k]
    nll = np.asarray([row["iwae_nll"] for row in by_k])
    se = np.asarray([row["se"] for row in by_k])
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.errorbar(ks, nll, yerr=se, marker="o", capsize=3)
    ax.set_xscale("log")
    ax.set_xlabel("K (importance samples per image)")
    ax.set_ylabel("IWAE bound: -log p(x) (nats)")
    ax.set_title(title or "IWAE bound against K")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def loss_curves(workdir: str | os.PathLike, path: str | os.PathLike,
                title: str = "") -> pathlib.Path:
    """Train and validation loss, recon and KL per epoch from workdir/metrics.jsonl (and
    test, where report.epoch_test_metrics logged it), with beta on a second axis of the
    KL panel. Needs no checkpoint."""
    records = read_metrics(workdir)
    if not any(r.get("split") in ("train", "validation", "test") for r in records):
        raise FileNotFoundError(f"{pathlib.Path(workdir) / 'metrics.jsonl'} is missing or has "
                                "no epoch records yet: loss curves need at least one "
                                "finished epoch.")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    names = {"loss": "loss (recon + β·KL)", "recon": "recon", "kl": "KL (nats)"}
    for ax, (key, label) in zip(axes, names.items()):
        for split, style in (("train", "-"), ("validation", "--"), ("test", "-.")):
            epochs, values = series(records, split, key)
            if not len(epochs):
                continue
            ax.plot(epochs, values, style, marker="o" if len(epochs) < 20 else None,
                    label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{label} per image")
        ax.set_title(label)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    epochs, beta = series(records, "validation", "beta")
    if not len(epochs):  # a run of an earlier fvae logged test lines only
        epochs, beta = series(records, "test", "beta")
    twin = axes[2].twinx()
    twin.plot(epochs, beta, ":", color="0.4", label="β (right axis)")
    twin.set_ylabel("β")
    handles = axes[2].get_legend_handles_labels()
    extra = twin.get_legend_handles_labels()
    axes[2].legend(handles[0] + extra[0], handles[1] + extra[1], frameon=False)
    axes[0].legend(frameon=False)
    fig.suptitle(title or f"{pathlib.Path(workdir).name}: training curves")
    fig.tight_layout()
    return save_figure(fig, path)


# ---- everything for one run ----

def write_figures(model, params, config: ml_collections.ConfigDict, dataset,
                  out_dir: str | os.PathLike, key: jax.Array, num_images: int = 16,
                  max_points: int = 5000, grid_size: int = 15, num_pairs: int = 5,
                  num_steps: int = 10, batch_size: int = 500,
                  add_images: Callable[..., None] | None = None) -> list[pathlib.Path]:
    """Every per-run figure of in-memory parameters into out_dir; returns the paths.

    Reconstructions, prior samples (from `key`), latent manifold, latent scatter,
    interpolations and KL per dimension; manifold and scatter need latent_dim >= 2.
    `add_images(tag, images, ncols=...)`, if given, receives the reconstruction and
    sample grids as arrays too (train: TensorBoard), so they are computed once.
    """
    out_dir, name = pathlib.Path(out_dir), config.name
    mean_fn = functools.partial(losses.pixel_mean, loss_config=config.loss)
    encode = jax.jit(functools.partial(models.encode, model))
    decode = jax.jit(lambda p, z: mean_fn(models.decode(model, p, z)))

    def to_images(z):
        return map_batches(decode, params, z, batch_size)

    test, labels = dataset.test_images, dataset.test_labels
    mean, logvar = map_batches(encode, params, test, batch_size)

    n = min(num_images, len(test))
    originals, recons = test[:n] / 255.0, to_images(mean[:n])
    samples = np.asarray(models.sample(model, params, key, num_images,
                                       config.model.latent_dim, mean_fn=mean_fn))
    paths = [reconstruction_grid(originals, recons, out_dir / "reconstructions.png",
                                 title=f"{name}: test images and reconstructions"),
             sample_grid(samples, out_dir / "samples.png",
                         title=f"{name}: samples from the prior")]
    if add_images is not None and n:
        add_images("test/reconstructions", np.concatenate(
            [originals.reshape(n, 28, 28), np.asarray(recons).reshape(n, 28, 28)]), ncols=n)
        add_images("prior/samples", samples.reshape(-1, 28, 28))
    pairs = min(num_pairs, len(test) // 2)
    if pairs:
        z = interpolation_latents(mean[0:2 * pairs:2], mean[1:2 * pairs:2], num_steps)
        decoded = to_images(z.reshape(-1, z.shape[-1])).reshape(pairs, num_steps, 28, 28)
        paths.append(interpolation_grid(test[:2 * pairs] / 255.0, decoded,
                                        out_dir / "interpolations.png",
                                        title=f"{name}: interpolations in latent space"))
    kl, variance = latent_statistics(mean, logvar)
    paths.append(kl_per_dimension(kl, variance, out_dir / "kl_per_dimension.png",
                                  title=f"{name}: KL per latent dimension"))
    if config.model.latent_dim < 2:
        logging.info("latent_dim is 1: no latent manifold or scatter figure")
        return paths
    plane = principal_plane(mean)
    z, coords = manifold_latents(plane, grid_size)
    paths.append(latent_manifold(to_images(z), coords, plane, out_dir / "latent_manifold.png",
                                 title=f"{name}: latent manifold (pixel means)"))
    keep = np.arange(len(mean))
    if len(keep) > max_points:
        keep = np.sort(np.random.default_rng(0).choice(len(keep), max_points, replace=False))
    paths.append(latent_scatter(plane.project(mean[keep]), labels[keep], plane,
                                out_dir / "latent_scatter.png",
                                title=f"{name}: test posterior means ({len(keep)} images)"))
    return paths
