"""The study's high-capacity VAE, summed MSE, 32-D latent, beta 1."""

from fvae.configs import get_base_config


def get_config():
    config = get_base_config()
    config.name = "mse_dh32"
    config.model.latent_dim = 32
    config.loss.likelihood = "mse"
    config.loss.reduction = "sum"
    config.loss.beta = 1.0
    return config
