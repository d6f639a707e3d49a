"""The cost of a checkpoint's checksums (fvae.checkpoint.checksums), per save and per
restore, for an experiment's whole train state.

    python -m fvae.bench.checksums --config sharp_bce
"""

import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from fvae import checkpoint, configs, cpu, parallel, steps, train

config_flags.DEFINE_config_file("config", None, "Experiment config (a file or a name).")
flags.DEFINE_integer("repeats", 7, "Timed repetitions (the median is reported).")


def main(_):
    config = flags.FLAGS.config
    model = train.training_model(config, parallel.make_data_parallel(1))
    state = steps.create_train_state(config, model, jax.random.key(0), 100)
    tree = jax.block_until_ready(steps.state_tree(state, steps.zero_metrics()))
    leaves = jax.tree.leaves(tree)
    megabytes = sum(np.asarray(x).nbytes for x in leaves) / 1e6
    checkpoint.checksums(tree)  # (warm)
    seconds = []
    for _ in range(flags.FLAGS.repeats):
        start = time.perf_counter()
        checkpoint.checksums(tree)
        seconds.append(time.perf_counter() - start)
    print(f"{config.name}: {megabytes:.1f} MB in {len(leaves)} arrays; CRC-32 of all: "
          f"median {np.median(seconds) * 1e3:.1f} ms ({megabytes / np.median(seconds):.0f} "
          f"MB/s) on {cpu.cpu_description()}")


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: app.parse_flags_with_usage(
        configs.resolve_config_flag(argv)))
