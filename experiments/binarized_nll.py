"""The protocol of published Fashion-MNIST likelihood tables: a Bernoulli decoder trained
on dynamically binarised images (fresh draws every step), evaluated by importance
sampling (IWAE, K = 5000) on one fixed binarisation of the test set, beta 1."""

from fvae.configs import get_base_config


def get_config():
    config = get_base_config()
    config.name = "binarized_nll"
    config.model.latent_dim = 32
    config.loss.likelihood = "bce"
    config.loss.beta = 1.0
    config.data.binarize = "dynamic"
    return config
