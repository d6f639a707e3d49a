"""Continuous Bernoulli (Loaiza-Ganem & Cunningham 2019): the normalised [0, 1] density
that BCE on grey levels is not, at beta 1 with a 32-D latent."""

from fvae.configs import get_base_config


def get_config():
    config = get_base_config()
    config.name = "cb"
    config.model.latent_dim = 32
    config.loss.likelihood = "continuous_bernoulli"
    config.loss.beta = 1.0
    return config
