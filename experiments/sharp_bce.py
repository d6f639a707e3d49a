"""The study's "sharp" model: summed BCE, beta 0.01, 32-D latent, linear KL warm-up."""

from fvae.configs import get_base_config


def get_config():
    config = get_base_config()
    config.name = "sharp_bce"
    config.model.latent_dim = 32
    config.loss.likelihood = "bce"
    config.loss.beta = 0.01
    config.loss.beta_schedule = "linear"
    config.loss.beta_start = 0.0
    config.loss.warmup_epochs = 2.0
    return config
