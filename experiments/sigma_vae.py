"""sigma-VAE (Rybkin et al. 2021): a Gaussian likelihood with one variance for all
pixels, set to its analytic optimum (the batch's MSE) each step, so beta 1 gives sharp
images without hand-tuning a weight; 32-D latent.

'optimal' is the paper's recommended variant and needs no extra parameter. Its ELBO
uses the sigma of the batch being evaluated; for a likelihood of one fixed model use
loss.gaussian_variance='learned' with model.decoder_scale='shared' (slower to settle:
Adam moves the log sigma by about the learning rate per step, from 0).
"""

from fvae.configs import get_base_config


def get_config():
    config = get_base_config()
    config.name = "sigma_vae"
    config.model.latent_dim = 32
    config.loss.likelihood = "gaussian"
    config.loss.gaussian_variance = "optimal"
    config.loss.beta = 1.0
    return config
