"""Reference implementations of the study's model for `python -m fvae.bench --reference`."""
