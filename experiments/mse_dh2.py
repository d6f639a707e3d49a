"""The study's high-capacity VAE, summed MSE, 2-D latent, beta 1 (the blurry baseline)."""

from fvae.configs import get_base_config


def get_config():
    config = get_base_config()
    config.name = "mse_dh2"
    config.model.latent_dim = 2
    config.loss.likelihood = "mse"
    config.loss.reduction = "sum"
    config.loss.beta = 1.0
    return config
