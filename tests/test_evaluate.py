import json
import pathlib
import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fvae import binarize, checkpoint, classifier, data, evaluate, losses, models, runs, train

EVAL_KEYS = {"elbo", "nll_recon", "kl", "kl_per_dim", "active_units", "iwae_nll",
             "recon_mse", "psnr", "ssim", "sharpness", "fd_samples", "fd_recons",
             "classifier_test_accuracy", "probe_accuracy", "num_test_images",
             "iwae_samples", "iwae_num_images", "fd_num_samples", "iwae_seconds",
             "eval_seconds", "eval_settings", "checkpoint_step", "selection", "iwae_nll_se",
             "iwae_by_k", "iwae_elbo", "iwae_ess_mean", "iwae_ess_p5", "iwae_levelled_off",
             "iwae_last_gain", "iwae_last_gain_se", "provenance"}
QUICK_EVAL = {"eval.iwae_samples": 40, "eval.iwae_decode_batch": 64,
              "eval.classifier_epochs": 2, "eval.probe_steps": 50}


@pytest.fixture(scope="module")
def run(tiny_data_dir, tmp_path_factory):
    """A trained tiny run: (workdir, config, model, params, dataset)."""
    root = tmp_path_factory.mktemp("eval_run")
    config = tiny_config(tiny_data_dir, **QUICK_EVAL,
                         **{"eval.classifier_dir": str(root / "classifier")})
    train.train_and_evaluate(config, str(root / "run"))
    _, model, params = runs.load_checkpoint(root / "run", "best")[:3]
    return root / "run", config, model, params, data.load(config)


# ---- image quality -------------------------------------------------------------
def ssim_reference(x, y):
    """SSIM by a loop over every 11x11 window with the 2-D Gaussian weights."""
    g = evaluate.gaussian_window(11, 1.5)
    w2 = np.outer(g, g)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            ma, mb = np.sum(w2 * a), np.sum(w2 * b)
            va, vb = np.sum(w2 * (a - ma) ** 2), np.sum(w2 * (b - mb) ** 2)
            cov = np.sum(w2 * (a - ma) * (b - mb))
            values.append((2 * ma * mb + c1) * (2 * cov + c2)
                          / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return np.mean(values)


def test_ssim_matches_a_direct_window_loop_and_is_one_for_equal_images():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(3, 28, 28))
    y = np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1)
    np.testing.assert_allclose(evaluate.ssim(x, y), [ssim_reference(a, b) for a, b in zip(x, y)],
                               rtol=1e-10)
    np.testing.assert_allclose(evaluate.ssim(x, x), 1.0, rtol=1e-12)
    assert evaluate.ssim(x, y).max() < 0.9


def test_psnr_recon_mse_and_sharpness_follow_their_formulas():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(4, 28, 28))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    mse = ((x - y) ** 2).reshape(4, -1).mean(1)
    np.testing.assert_allclose(evaluate.psnr(x, y), 10 * np.log10(1 / mse), rtol=1e-12)
    m = evaluate.image_metrics(x, y)
    assert m["recon_mse"] == pytest.approx(mse.mean())
    blurred = (x + np.roll(x, 1, 1) + np.roll(x, 1, 2) + np.roll(x, (1, 1), (1, 2))) / 4
    assert evaluate.image_metrics(x, blurred)["sharpness"] < 0.6
    assert evaluate.image_metrics(x, x)["sharpness"] == pytest.approx(1.0)
    energy = evaluate.gradient_energy(x[:1])[0]
    assert energy == pytest.approx(np.mean((x[0, :, 1:] - x[0, :, :-1]) ** 2)
                                   + np.mean((x[0, 1:] - x[0, :-1]) ** 2))


# ---- Fréchet distance ----------------------------------------------------------
def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(2)
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    expected = np.sum((m1 - m2) ** 2) + np.sum((s1 - s2) ** 2)
    got = evaluate.frechet_distance(m1, np.diag(s1 ** 2), m2, np.diag(s2 ** 2))
    assert got == pytest.approx(expected, rel=1e-10)


def log_normal(z, mean, std):
    return np.sum(-0.5 * ((z - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi), 1)


def test_frechet_distance_matches_eigenvalues_of_s1_s2_and_is_zero_for_equal_sets():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(500, 6)), rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    (m1, c1), (m2, c2) = evaluate.feature_stats(a), evaluate.feature_stats(b)
    # Tr (S1 S2)^(1/2) is the sum of the square roots of the eigenvalues of S1 S2.
    trace_sqrt = np.sum(np.sqrt(np.linalg.eigvals(c1 @ c2).real))
    expected = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2) - 2 * trace_sqrt
    assert evaluate.frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-8)
    assert evaluate.features_fd(a, a) == pytest.approx(0.0, abs=1e-9)
    rank_deficient = np.repeat(a[:, :1], 6, axis=1)  # a singular covariance stays finite
    assert np.isfinite(evaluate.features_fd(rank_deficient, b))


# ---- latent statistics and probe -----------------------------------------------
def test_active_units_counts_dimensions_whose_posterior_mean_varies():
    rng = np.random.default_rng(4)
    means = np.concatenate([rng.normal(0, 1, (200, 3)), rng.normal(0, 0.05, (200, 2))], 1)
    assert evaluate.active_units(means) == 3


def test_active_units_of_a_constructed_encoder(run, monkeypatch):
    """An encoder whose mean varies with the input in 3 of 5 dimensions."""
    _, config, _, _, dataset = run
    config = tiny_config(config.data.dir, **{"model.latent_dim": 5})
    model = models.build_model(config.model)
    params = models.init_params(model, jax.random.key(0))

    def fake_encode(model, params, images):
        x = models.to_float(images).reshape(images.shape[0], -1)
        varying = jnp.stack([x[:, 100], x[:, 300], x[:, 500]], 1) * 10
        mean = jnp.concatenate([varying, 1e-3 * varying[:, :2]], 1)
        return mean, jnp.zeros_like(mean)

    monkeypatch.setattr(models, "encode", fake_encode)
    assert evaluate.epoch_image_metrics(model, params, config, dataset.test_images)[
        "active_units"] == 3


def test_kl_per_dim_sums_to_the_kl():
    rng = np.random.default_rng(5)
    mean, logvar = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
    np.testing.assert_allclose(evaluate.kl_per_dim(mean, logvar).sum(),
                               np.mean(losses.gaussian_kl(mean, logvar)), rtol=1e-5)


def test_probe_reads_a_linearly_separable_class_and_not_noise():
    rng = np.random.default_rng(6)
    centers = rng.normal(0, 3, (10, 4)) + 100  # offset: standardisation must handle it
    ytr, yte = rng.integers(0, 10, 1000), rng.integers(0, 10, 300)
    ztr = centers[ytr] + rng.normal(size=(1000, 4))
    zte = centers[yte] + rng.normal(size=(300, 4))
    assert evaluate.probe_accuracy(ztr, ytr, zte, yte, steps=100) > 0.85
    noise = rng.normal(size=(300, 4))
    assert evaluate.probe_accuracy(ztr, ytr, noise, yte, steps=100) < 0.3


# ---- IWAE ----------------------------------------------------------------------
def test_log_weights_match_an_independent_density_computation(run):
    _, config, model, params, dataset = run
    images, key = dataset.test_images[:3], jax.random.key(7)
    log_w = evaluate.log_importance_weights(model, params, images, key, 4, config.loss,
                                            chunk=2)
    mean, logvar = models.encode(model, params, images)
    std = np.exp(0.5 * np.asarray(logvar, np.float64))
    x = models.to_float(images)
    for k in range(4):
        eps = evaluate._eps(key, jnp.arange(3), jnp.array([k]), mean.shape[1])[0]
        z = mean + jnp.exp(0.5 * logvar) * eps
        nll = losses.negative_log_likelihood(models.decode(model, params, z), x, config.loss)
        z = np.asarray(z, np.float64)
        expected = (-np.asarray(nll) + log_normal(z, 0.0, 1.0)
                    - log_normal(z, np.asarray(mean, np.float64), std))
        np.testing.assert_allclose(log_w[k], expected, rtol=1e-5, atol=1e-3)
    # K = 1: the bound is the single-sample ELBO estimate of that draw.
    np.testing.assert_allclose(evaluate.iwae_bound(log_w[:1]), log_w[0], rtol=1e-6)


def test_minus_mean_log_weight_estimates_recon_plus_kl(run):
    """E_q[-log w] = E_q[-log p(x|z)] + KL: Monte Carlo against fvae.losses."""
    _, config, model, params, dataset = run
    images = dataset.test_images[:4]
    log_w = np.asarray(evaluate.log_importance_weights(
        model, params, images, jax.random.key(8), 512, config.loss, chunk=128))
    mean, logvar = models.encode(model, params, images)
    z = jax.vmap(lambda k: models.reparameterize(k, mean, logvar))(
        jax.random.split(jax.random.key(9), 128))  # [128, 4, D]
    x = jnp.tile(models.to_float(images), (128, 1, 1, 1))
    nll = np.asarray(losses.negative_log_likelihood(
        models.decode(model, params, z.reshape(512, -1)), x, config.loss)).reshape(128, 4)
    reference = nll.mean(0) + np.asarray(losses.gaussian_kl(mean, logvar))
    tolerance = 5 * np.sqrt(log_w.var(0) / 512 + nll.var(0) / 128) + 1e-3
    assert np.all(np.abs(-log_w.mean(0) - reference) < tolerance)


def test_iwae_bound_tightens_with_k_and_never_falls_below_the_elbo(run):
    """Groups of one draw: the mean bound over disjoint groups of size k can only rise
    as groups merge (log mean exp of two >= their mean), from the ELBO at k = 1."""
    _, config, model, params, dataset = run
    log_w = evaluate.log_importance_weights(model, params, dataset.test_images[:8],
                                            jax.random.key(10), 64, config.loss, chunk=16)
    bounds = [np.asarray(evaluate.iwae_bound(log_w.reshape(64 // k, k, 8)
                                             .transpose(1, 0, 2))).mean(0)
              for k in (1, 2, 4, 8, 16, 32, 64)]
    np.testing.assert_allclose(bounds[0], np.asarray(log_w).mean(0), rtol=1e-6)
    for smaller, larger in zip(bounds, bounds[1:]):
        assert np.all(larger >= smaller - 1e-3)
    assert np.mean(bounds[-1] - bounds[0]) > 0.1  # strictly tighter on average
    prefixes = [-np.asarray(evaluate.iwae_bound(log_w[:k])).mean() for k in (1, 8, 64)]
    assert prefixes[0] > prefixes[1] > prefixes[2]  # iwae_nll falls with K


def test_bounds_do_not_depend_on_batching(run):
    _, config, model, params, dataset = run
    images, key = dataset.test_images[:10], jax.random.key(11)
    a = evaluate.likelihood_bounds(model, params, config.loss, images, key, 12, 24)
    b = evaluate.likelihood_bounds(model, params, config.loss, images, key, 12, 5)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5)
    assert a[0].shape == a[1].shape == (10,)


def test_one_pass_gives_the_bound_at_every_k_the_ess_and_the_elbo_of_its_draws(run):
    """Against numpy on the same draws (log_importance_weights uses the same keys)."""
    _, config, model, params, dataset = run
    images, key = dataset.test_images[:6], jax.random.key(12)
    out = evaluate.importance_sampled(model, params, config.loss, images, key, 30, 24)
    log_w = np.asarray(evaluate.log_importance_weights(model, params, images, key, 30,
                                                       config.loss), np.float64)
    assert evaluate.k_ladder(30) == (1, 10, 30)
    for j, k in enumerate((1, 10, 30)):
        top = log_w[:k].max(0)
        expected = top + np.log(np.exp(log_w[:k] - top).sum(0)) - np.log(k)
        np.testing.assert_allclose(out["log_px_by_k"][:, j], expected, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(out["log_px_by_k"][:, -1], out["log_px"])
    w = np.exp(log_w - log_w.max(0))
    np.testing.assert_allclose(out["ess"], w.sum(0) ** 2 / (w ** 2).sum(0), rtol=1e-3)
    assert np.all((out["ess"] >= 1 - 1e-4) & (out["ess"] <= 30 + 1e-3))
    np.testing.assert_allclose(out["elbo"], -log_w.mean(0), rtol=1e-5)
    log_px, nll = evaluate.likelihood_bounds(model, params, config.loss, images, key, 30, 24)
    np.testing.assert_array_equal(log_px, out["log_px"])
    np.testing.assert_array_equal(nll, out["nll"])


def test_k_ladder_and_the_summary_of_the_draws():
    assert evaluate.k_ladder(5000) == (1, 10, 100, 1000, 5000)
    assert evaluate.k_ladder(100) == (1, 10, 100) and evaluate.k_ladder(1) == (1,)
    rng = np.random.default_rng(0)
    by_k = np.stack([-100 - rng.normal(size=400), -95 - rng.normal(size=400)], 1)
    draws = {"log_px": by_k[:, -1], "log_px_by_k": by_k, "elbo": 101 + rng.normal(size=400),
             "ess": rng.uniform(1, 10, 400)}
    summary = evaluate.iwae_summary(draws, 10)
    assert summary["iwae_nll"] == pytest.approx(-by_k[:, 1].mean())
    assert summary["iwae_nll_se"] == pytest.approx(by_k[:, 1].std(ddof=1) / 20)
    assert [row["k"] for row in summary["iwae_by_k"]] == [1, 10]
    assert summary["iwae_ess_p5"] == pytest.approx(np.percentile(draws["ess"], 5))
    gain = by_k[:, 1] - by_k[:, 0]
    assert summary["iwae_last_gain"] == pytest.approx(gain.mean())
    assert summary["iwae_last_gain_se"] == pytest.approx(gain.std(ddof=1) / 20)
    assert not summary["iwae_levelled_off"]  # gained ~5 nats, standard error ~0.07
    # A gain far inside the spread over images but outside its own (paired) error:
    # still moving. (The over-images standard error, ~0.05 here, would not say so.)
    spread = np.stack([-100 - 10 * rng.normal(size=400)] * 2, 1) + [[0, 0.5]]
    assert not evaluate.iwae_summary({**draws, "log_px_by_k": spread}, 10)["iwae_levelled_off"]
    level = by_k.copy()
    level[:, 0] = by_k[:, 1] + rng.normal(scale=0.01, size=400)  # noise only
    assert evaluate.iwae_summary({**draws, "log_px_by_k": level}, 10)["iwae_levelled_off"]
    one = {k: v[:1] for k, v in draws.items()}  # one image: no standard error, no verdict
    assert evaluate.iwae_summary(one, 10)["iwae_levelled_off"] is None
    assert evaluate.iwae_summary({**draws, "log_px_by_k": by_k[:, :1]}, 1)[
        "iwae_levelled_off"] is None


# ---- binarisation --------------------------------------------------------------
def test_binarize_draws_bernoulli_pixels_and_is_fixed_per_image():
    images = np.tile(np.array([0, 64, 128, 255], np.uint8), (2000, 1)).reshape(2000, 2, 2)
    out = np.asarray(binarize.binarize(jax.random.key(0), images))
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 255}
    np.testing.assert_allclose((out / 255).reshape(2000, 4).mean(0), [0, 64 / 255,
                               128 / 255, 1], atol=0.04)
    fixed = binarize.binarize_fixed(images)
    np.testing.assert_array_equal(binarize.binarize_fixed(images[:7]), fixed[:7])
    np.testing.assert_array_equal(binarize.binarize_fixed(images), fixed)
    with pytest.raises(TypeError, match="uint8"):
        binarize.binarize(jax.random.key(0), images / 255.0)


# ---- classifier ----------------------------------------------------------------
def test_classifier_is_cached_verified_and_retrained_offline(run, tmp_path, monkeypatch):
    _, _, _, _, ds = run

    def no_network(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    calls = []
    real_train = classifier.train
    monkeypatch.setattr(classifier, "train",
                        lambda *a, **k: calls.append(1) or real_train(*a, **k))
    args = (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels, 1, tmp_path)
    first = classifier.load_or_train(*args, progress=False)
    assert len(calls) == 1 and 0.0 <= first.test_accuracy <= 1.0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[1] == files[0] + ".sha256"
    second = classifier.load_or_train(*args, progress=False)
    assert len(calls) == 1  # loaded, not retrained
    jax.tree.map(np.testing.assert_array_equal, first.params, second.params)
    assert second.test_accuracy == first.test_accuracy
    path = tmp_path / files[0]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    third = classifier.load_or_train(*args, progress=False)
    assert len(calls) == 2  # the corrupt file was retrained and rewritten
    jax.tree.map(np.testing.assert_array_equal, first.params, third.params)
    classifier.load_or_train(*args, progress=False)
    assert len(calls) == 2
    features = classifier.features(first, ds.test_images[:5])
    assert features.shape == (5, classifier.FEATURE_DIM)


def test_classifier_cache_is_keyed_by_the_data():
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 255, (8, 28, 28), np.uint8), np.arange(8) % 10
    a = classifier.fingerprint(images, labels, epochs=1)
    assert a != classifier.fingerprint(images[::-1], labels, epochs=1)
    assert a != classifier.fingerprint(images, labels, epochs=2)


# ---- end to end ----------------------------------------------------------------
def test_evaluate_run_writes_every_metric(run):
    workdir, config, _, _, _ = run
    results = runs.evaluate_run(workdir, "best", config=config, progress=False)
    written = json.loads((workdir / "eval.json").read_text())
    assert set(written) == EVAL_KEYS
    assert written["num_test_images"] == 64 and written["iwae_samples"] == 40
    assert written["eval_settings"]["iwae_samples"] == 40  # what the sweep checks
    assert written["checkpoint_step"] == runs.load_checkpoint(workdir, "best").step > 0
    assert len(written["kl_per_dim"]) == config.model.latent_dim
    assert sum(written["kl_per_dim"]) == pytest.approx(written["kl"], rel=1e-4)
    assert written["elbo"] == pytest.approx(written["nll_recon"] + written["kl"], rel=1e-6)
    assert written["iwae_nll"] < written["elbo"]  # K = 40 is tighter than the ELBO
    assert written["iwae_nll"] < written["iwae_elbo"]  # and than the ELBO of its own draws
    assert [row["k"] for row in written["iwae_by_k"]] == [1, 10, 40]
    assert written["iwae_by_k"][-1]["iwae_nll"] == written["iwae_nll"]
    assert written["iwae_nll_se"] == written["iwae_by_k"][-1]["se"] > 0
    assert 1 <= written["iwae_ess_p5"] <= written["iwae_ess_mean"] <= 40
    assert written["selection"]["step"] == written["checkpoint_step"]
    assert written["provenance"]["versions"]["jax"] == jax.__version__
    assert (workdir / "figures" / "iwae_vs_k.png").stat().st_size > 1000
    assert 0 < written["ssim"] <= 1 and written["psnr"] > 0 and written["fd_samples"] > 0
    assert 0 <= written["probe_accuracy"] <= 1
    assert results["iwae_nll"] == pytest.approx(written["iwae_nll"])
    cheap = evaluate.epoch_image_metrics(*run[2:4], config, run[4].test_images)
    for key, value in cheap.items():
        assert value == pytest.approx(written[key], rel=1e-6), key


def test_evaluate_run_rejects_a_config_of_another_model(run):
    workdir, config, _, _, _ = run
    other = tiny_config(config.data.dir, **{"model.latent_dim": 3})
    with pytest.raises(checkpoint.CheckpointError, match="model.latent_dim"):
        runs.evaluate_run(workdir, config=other, progress=False)


def test_an_unwritable_workdir_is_refused_before_the_evaluation(run, monkeypatch):
    workdir, config, _, _, _ = run
    real_write = pathlib.Path.write_text

    def write_text(path, *args, **kwargs):  # (root ignores read-only modes: pretend)
        if path.parent == workdir:
            raise PermissionError(13, "Permission denied", str(path))
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    monkeypatch.setattr(evaluate, "full_evaluation", lambda *a, **k: pytest.fail("evaluated"))
    with pytest.raises(checkpoint.CheckpointError,
                       match="cannot write .*eval.json \\(Permission denied\\); nothing was"):
        runs.evaluate_run(workdir, config=config, progress=False)


def test_results_that_cannot_be_written_at_the_end_are_printed(run, monkeypatch, capsys,
                                                               tmp_path):
    workdir, config, _, _, _ = run
    before = (workdir / "eval.json").read_bytes() if (workdir / "eval.json").exists() else None

    real_write = pathlib.Path.write_text

    def write_text(path, *args, **kwargs):  # the disk fills during the evaluation
        if path.name == "eval.json.tmp":
            real_write(path, "{\"half\": ")
            raise OSError(28, "No space left on device", str(path))
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    with pytest.raises(checkpoint.CheckpointError, match="results are printed above"):
        runs.evaluate_run(workdir, config=config, progress=False)
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == EVAL_KEYS and printed["iwae_nll"] > 0
    assert not (workdir / "eval.json.tmp").exists()
    after = (workdir / "eval.json").read_bytes() if (workdir / "eval.json").exists() else None
    assert after == before  # an earlier eval.json is left as it was


def test_binarised_protocol_and_bits_per_dimension(run):
    """mse + data.binarize='dynamic': binary inputs, iwae_bpd reported."""
    _, config, model, params, dataset = run
    config = tiny_config(config.data.dir, **QUICK_EVAL, **{
        "eval.classifier_dir": config.eval.classifier_dir, "loss.likelihood": "mse",
        "data.binarize": "dynamic", "eval.iwae_num_images": 16, "eval.fd_num_samples": 32})
    inputs = evaluate.model_inputs(config, dataset.test_images)
    assert set(np.unique(inputs)) == {0, 255}
    results = evaluate.full_evaluation(model, params, config, dataset, progress=False)
    assert results["iwae_num_images"] == 16 and results["fd_num_samples"] == 32
    assert results["iwae_bpd"] == pytest.approx(results["iwae_nll"] / (784 * np.log(2)))
    _, nll = evaluate.likelihood_bounds(model, params, config.loss, inputs,
                                        jax.random.fold_in(jax.random.key(0), 0), 1, 1024)
    assert results["nll_recon"] == pytest.approx(nll.mean(), rel=1e-6)


# ---- the optimal-variance Gaussian: one fixed sigma in evaluation -----------------
def test_optimal_gaussian_is_scored_with_one_sigma_fitted_on_the_training_split(run):
    """gaussian_log_sigma is the log root mean squared error of reconstructions from one
    posterior draw per training image; with it every image's bounds are those of one
    fixed Gaussian, whatever the batching (a sigma fitted per decoded batch is not)."""
    _, config, model, params, dataset = run
    config = tiny_config(config.data.dir, **QUICK_EVAL, **{
        "eval.classifier_dir": config.eval.classifier_dir, "loss.likelihood": "gaussian",
        "loss.gaussian_variance": "optimal", "eval.iwae_num_images": 16,
        "eval.fd_num_samples": 32})
    train_images, key = dataset.train_images, jax.random.key(5)
    log_sigma = evaluate.gaussian_log_sigma(model, params, config.loss, train_images, key, 7)
    x = jnp.asarray(train_images, jnp.float32)[..., None] / 255.0  # one batch, by hand
    mean, logvar = models.encode(model, params, x)
    eps = evaluate._eps(key, jnp.arange(len(x)), jnp.arange(1), mean.shape[-1])[0]
    recon = jax.nn.sigmoid(models.decode(model, params, mean + jnp.exp(0.5 * logvar) * eps))
    mse = np.mean((np.float64(recon) - np.float64(x)) ** 2)
    assert log_sigma == pytest.approx(0.5 * np.log(mse), rel=1e-5)

    images = dataset.test_images[:10]
    fixed = [evaluate.likelihood_bounds(model, params, config.loss, images, key, 6, d,
                                        log_sigma=log_sigma) for d in (60, 6)]
    np.testing.assert_allclose(fixed[0][0], fixed[1][0], rtol=1e-5)
    refit = [evaluate.likelihood_bounds(model, params, config.loss, images, key, 6, d)
             for d in (60, 6)]
    assert not np.allclose(refit[0][0], refit[1][0], rtol=1e-3)

    results = evaluate.full_evaluation(model, params, config, dataset, progress=False)
    assert results["gaussian_log_sigma"] == pytest.approx(evaluate.gaussian_log_sigma(
        model, params, config.loss, train_images,
        jax.random.fold_in(jax.random.key(config.eval.seed), 3), 48), rel=1e-6)
    _, nll = evaluate.likelihood_bounds(
        model, params, config.loss, dataset.test_images,
        jax.random.fold_in(jax.random.key(config.eval.seed), 0), 1, 1024,
        log_sigma=results["gaussian_log_sigma"])
    assert results["nll_recon"] == pytest.approx(nll.mean(), rel=1e-6)
    assert results["iwae_nll"] < results["elbo"]
