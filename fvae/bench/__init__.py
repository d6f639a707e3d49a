"""fvae's benchmarks, all in one place.

    python -m fvae.bench            # training.py: the training step, images/s and memory
    python -m fvae.bench.kernels    # kernels.py: the measured dispatch, layer by layer
    python -m fvae.bench.profile    # profile.py: where a training step's time goes, op by op
    python -m fvae.bench.onednn     # onednn.py: oneDNN's convolutions (via PyTorch) vs the dispatch
    python -m fvae.bench.checksums  # checksums.py: the cost of a checkpoint's checksums

keras_reference.py and torch_reference.py are the study's model in Keras and PyTorch,
timed by `python -m fvae.bench --reference keras,torch` in the same protocol
(common.py).
"""
