"""Train a VAE from one config file: the same as `fvae-train` (see fvae/launch.py).

    python launch.py --config experiments/sharp_bce.py --workdir runs/sharp_bce
"""

from fvae.launch import run

if __name__ == "__main__":
    run()
