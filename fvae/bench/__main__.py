"""`python -m fvae.bench`: the training-step benchmark (fvae/bench/training.py)."""

from fvae.bench.training import main

main()
