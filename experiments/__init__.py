"""The study's experiment and sweep configs; installed with fvae as fvae.experiments."""
