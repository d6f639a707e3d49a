"""The study's VAE written the obvious way in PyTorch, eager or torch.compile'd.

    pip install torch==2.13.0   # a CPU build
    python -m fvae.bench --reference torch,torch_compile
"""

import os

import numpy as np
import torch
from torch import nn

from fvae.bench.common import report, spec_from_argv, time_steps


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.b(torch.relu(self.a(x))))


def up(cin, cout):  # a 3x3 stride-2 'SAME' transposed conv: 7 -> 14 -> 28
    return nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)


class VAE(nn.Module):
    def __init__(self, model: str, latent: int):
        super().__init__()
        self.latent = latent
        if model == "keras":
            self.enc = nn.Sequential(nn.Conv2d(1, 32, 3, 2, 1), nn.ReLU(),
                                     nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(3136, 16), nn.ReLU(), nn.Linear(16, 2 * latent))
            self.dec = nn.Sequential(nn.Linear(latent, 3136), nn.ReLU(),
                                     nn.Unflatten(1, (64, 7, 7)), up(64, 64), nn.ReLU(),
                                     up(64, 32), nn.ReLU(), nn.ConvTranspose2d(32, 1, 3, padding=1))
        else:
            self.enc = nn.Sequential(nn.Conv2d(1, 32, 3, 2, 1), nn.ReLU(),
                                     nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
                                     nn.Conv2d(64, 128, 3, 1, 1), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(6272, 256), nn.ReLU(), nn.Linear(256, 2 * latent))
            self.dec = nn.Sequential(nn.Linear(latent, 6272), nn.ReLU(),
                                     nn.Unflatten(1, (128, 7, 7)), up(128, 64), nn.ReLU(),
                                     up(64, 32), nn.ReLU(), ResBlock(32), ResBlock(32),
                                     nn.Conv2d(32, 1, 3, padding=1))

    def forward(self, x):
        mean, logvar = self.enc(x).chunk(2, dim=1)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        logits = self.dec(z)
        recon = nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none")
        kl = 0.5 * (logvar.exp() + mean ** 2 - 1 - logvar).sum(1)
        return (recon.sum((1, 2, 3)) + kl).mean()


def main():
    spec = spec_from_argv()
    torch.set_num_threads(os.cpu_count())
    model = VAE(spec["model"], spec["latent_dim"])
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    forward = torch.compile(model) if spec["framework"] == "torch_compile" else model

    def step(x):
        optimizer.zero_grad(set_to_none=True)
        loss = forward(x)
        loss.backward()
        optimizer.step()
        return loss.item()

    rng = np.random.default_rng(0)
    batches = [torch.from_numpy(rng.integers(0, 256, (spec["batch_size"], 1, 28, 28))
                                .astype(np.float32) / 255) for _ in range(4)]
    first, per_step = time_steps(step, batches, spec["steps"])
    report(spec, spec["framework"], first, per_step, "cpu")


if __name__ == "__main__":
    main()
