"""Fails unless a run's validation loss fell clearly: last epoch < ratio * first epoch."""

import sys

from fvae.writer import read_metrics

workdir, ratio = sys.argv[1], float(sys.argv[2])
losses = [r["loss"] for r in read_metrics(workdir) if r["split"] == "validation"]
print("validation loss by epoch:", ", ".join(f"{v:.2f}" for v in losses))
if len(losses) < 2 or not losses[-1] < ratio * losses[0]:
    sys.exit(f"FAIL: validation loss did not fall below {ratio} x its first value")
print(f"ok: {losses[-1]:.2f} < {ratio} x {losses[0]:.2f}")
