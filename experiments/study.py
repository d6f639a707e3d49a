"""The study's own models, trained until they stop changing, and a rate-distortion sweep.

    python -m fvae.sweep --config experiments/study.py:cpu --sweep_dir runs/study
    python -m fvae.sweep --config experiments/study.py:gpu --sweep_dir runs/study_gpu
    python -m fvae.sweep --config experiments/study.py:rate_distortion --sweep_dir runs/rd

`cpu` and `gpu` train each of the study's experiment files (experiments/<name>.py, as
the file defines it) on all 60,000 training images less the 5,000 of the validation
split: 10 epochs and one seed on a CPU (about 2 hours, measured on 2 cores;
--estimate_only measures this machine), 50 epochs and three
seeds on a GPU. The length is a flag: --config.overrides.train.num_epochs=20, and
--config.seeds='(0,1,2)'. The checkpoint evaluated is the epoch of the lowest validation
ELBO (the best-epoch rule, no early stopping: every run trains its whole length).

`rate_distortion` puts BCE and summed MSE at latent 32 on a beta axis, for the
rate-distortion figure (Alemi et al. 2018); on a CPU it is the shorter one.
`warmup` trains the two largest betas of that axis without KL warm-up, to set beside
its warmed-up runs (does warm-up keep latent units active?).
"""

import ml_collections

STUDY_MODELS = ("sharp_bce", "mse_dh32", "mse_dh2", "keras_dh2", "binarized_nll",
                "sigma_vae")
# Every run's evaluation: the IWAE bound over the first 1,000 test images. The number to
# check against a paper (binarized_nll) gets K = 1000 draws, the others K = 100.
EVAL = {"iwae_samples": 100, "iwae_num_images": 1000}
PAPER_EVAL = {"iwae_samples": 1000, "iwae_num_images": 1000}


def get_config(preset: str = "cpu") -> ml_collections.ConfigDict:
    sweep = ml_collections.ConfigDict()
    sweep.base = "experiments/sharp_bce.py"  # (the base of presets without experiments)
    sweep.experiments_dir = "experiments"  # where the `experiment` axis finds its files
    sweep.warmup_epochs = 2.0
    sweep.vmap_seeds = "auto"
    sweep.axes = ml_collections.ConfigDict()
    sweep.overrides = ml_collections.ConfigDict()
    sweep.overrides_by_experiment = ml_collections.ConfigDict()
    sweep.overrides.eval = dict(EVAL)
    sweep.overrides.report = {"progress_bar": False}
    if preset in ("cpu", "gpu"):
        sweep.axes.experiment = STUDY_MODELS
        sweep.overrides_by_experiment.binarized_nll = {"eval": dict(PAPER_EVAL)}
        sweep.seeds = (0,) if preset == "cpu" else (0, 1, 2)
        sweep.overrides.train = {"num_epochs": 10 if preset == "cpu" else 50}
        if preset == "gpu":  # the whole test set at the paper's K
            sweep.overrides_by_experiment.binarized_nll = {
                "eval": {"iwae_samples": 5000, "iwae_num_images": 0}}
    elif preset == "rate_distortion":
        sweep.axes.likelihood = ("bce", "mse-sum")
        sweep.axes.beta = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
        sweep.axes.latent = (32,)
        sweep.axes.warmup = ("on",)
        sweep.seeds = (0,)
        sweep.overrides.train = {"num_epochs": 3}
    elif preset == "warmup":  # (the likeliest collapse first: summed MSE, beta 3)
        sweep.axes.likelihood = ("mse-sum", "bce")
        sweep.axes.beta = (3.0, 1.0)
        sweep.axes.latent = (32,)
        sweep.axes.warmup = ("off",)
        sweep.seeds = (0,)
        sweep.overrides.train = {"num_epochs": 3}
    else:
        raise ValueError(f"unknown study preset {preset!r}: use 'cpu', 'gpu', "
                         "'rate_distortion' or 'warmup'")
    return sweep
