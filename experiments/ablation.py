"""The study's ablations: likelihood x KL weight x latent size x warm-up, with seeds.

    python -m fvae.sweep --config experiments/ablation.py:quick --sweep_dir runs/ablation_quick
    python -m fvae.sweep --config experiments/ablation.py:full --sweep_dir runs/ablation_full
    python -m fvae.sweep --config experiments/ablation.py:likelihoods --sweep_dir runs/likelihoods

`quick` answers the study's three questions on a subset of the data (12 points x 2
seeds, about 20 minutes on a 2-core CPU); `likelihoods` puts the principled likelihoods
beside BCE and MSE at the same size; `full` is the whole grid on all of the data (about
a week on a 2-core CPU).
"""

import ml_collections


def get_config(preset: str = "quick") -> ml_collections.ConfigDict:
    sweep = ml_collections.ConfigDict()
    sweep.base = "experiments/sharp_bce.py"
    sweep.warmup_epochs = 2.0  # length of the linear warm-up where warmup=on
    sweep.vmap_seeds = "auto"  # train a point's seeds as one vmapped computation: on
    # accelerators ('auto'), 'always' or 'never' (it is slower on CPU)
    sweep.axes = ml_collections.ConfigDict()
    # Config values every run of the sweep changes, as a nested block like the config's.
    sweep.overrides = ml_collections.ConfigDict()
    if preset == "full":
        sweep.axes.likelihood = ("mse-sum", "mse-mean", "bce")
        sweep.axes.beta = (0.01, 0.1, 0.5, 1.0)
        sweep.axes.latent = (2, 32)
        sweep.axes.warmup = ("on", "off")
        sweep.seeds = (0, 1, 2)
        sweep.overrides.train = {"num_epochs": 20}
        sweep.overrides.eval = {"iwae_samples": 1000, "iwae_num_images": 2000}
    elif preset == "quick":
        sweep.axes.likelihood = ("mse-sum", "mse-mean", "bce")
        sweep.axes.beta = (0.01, 1.0)
        sweep.axes.latent = (32,)
        sweep.axes.warmup = ("on", "off")
        sweep.seeds = (0, 1)
        sweep.overrides.train = {"num_epochs": 4}
        sweep.overrides.runtime = {"eval_batch_size": 500}
        sweep.overrides.data = {"limit_train": 2048, "limit_test": 1000}
        sweep.overrides.eval = {"iwae_samples": 100, "iwae_num_images": 200}
    elif preset == "likelihoods":  # the principled likelihoods beside BCE and MSE, beta 1
        sweep.axes.likelihood = ("bce", "mse-sum", "cb", "sigma-optimal", "sigma-learned",
                                 "dlogistic")
        sweep.axes.beta = (1.0,)
        sweep.axes.latent = (32,)
        sweep.axes.warmup = ("on",)
        sweep.seeds = (0,)
        sweep.overrides.train = {"num_epochs": 4}
        sweep.overrides.runtime = {"eval_batch_size": 500}
        sweep.overrides.data = {"limit_train": 2048, "limit_test": 1000}
        sweep.overrides.eval = {"iwae_samples": 100, "iwae_num_images": 200}
    else:
        raise ValueError(f"unknown ablation preset {preset!r}: use 'quick', 'likelihoods' "
                         "or 'full'")
    return sweep
