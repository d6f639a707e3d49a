"""fvae: variational autoencoders on Fashion-MNIST in JAX/Flax."""

__version__ = "0.1.0"
