"""Train a VAE from one config file.

    python launch.py --config experiments/sharp_bce.py --workdir runs/sharp_bce
    python launch.py --config experiments/mse_dh2.py --config.model.latent_dim=32 ...

Flags only; everything else is in the config (see fvae/configs.py).
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fvae import configs, evaluate, logs, plots, runtime, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for this run's config, metrics, "
                    "checkpoints and figures.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "plot"],
                  "train: train (resuming if the workdir has checkpoints); eval: evaluate "
                  "the best checkpoint on the test split into workdir/eval.json; plot: "
                  "write every figure of the best checkpoint to workdir/figures/.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = configs.validate(FLAGS.config)
    runtime.restart_with_huge_pages(config)  # first: it starts this process over
    logs.show_own_info(__file__)
    runtime.setup_runtime(config)  # before any JAX computation
    if FLAGS.mode == "train":
        try:
            train.train_and_evaluate(config, FLAGS.workdir)
        except train.TrainingInterrupted as e:
            logging.warning("%s", e)
            sys.exit(128 + e.signum)
    elif FLAGS.mode == "eval":
        results = evaluate.evaluate_run(FLAGS.workdir, "best", config=config)
        print(json.dumps({k: v for k, v in results.items() if not isinstance(v, list)},
                         indent=2))
    elif FLAGS.mode == "plot":
        for path in plots.write_run_figures(FLAGS.workdir, data_dir=config.data.dir,
                                             num_images=config.train.num_figure_images or 16):
            print(path)


if __name__ == "__main__":
    app.run(main)
