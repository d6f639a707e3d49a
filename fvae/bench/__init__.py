"""fvae's benchmarks, all in one place.

    python -m fvae.bench            # training.py: the training step, images/s and memory
    python -m fvae.bench.kernels    # kernels.py: fvae's CPU convolution kernels vs XLA's
    python -m fvae.bench.checksums  # checksums.py: the cost of a checkpoint's checksums

keras_reference.py and torch_reference.py are the study's model in Keras and PyTorch,
timed by `python -m fvae.bench --reference keras,torch` in the same protocol
(common.py).
"""
