"""The classic small VAE of the Keras example: two convs, 2-D latent, summed BCE."""

from fvae.configs import get_base_config


def get_config():
    config = get_base_config()
    config.name = "keras_dh2"
    config.model.name = "keras"
    config.model.latent_dim = 2
    config.loss.likelihood = "bce"
    config.loss.beta = 1.0
    return config
