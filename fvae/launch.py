"""Train a VAE from one config file (fvae-train, python -m fvae train, launch.py).

    fvae-train --config sharp_bce --workdir runs/sharp_bce
    fvae-train --config experiments/mse_dh2.py --workdir runs/mse_dh2 \\
        --config.model.latent_dim=32 --config.train.num_epochs=20
    fvae-train --config sharp_bce --workdir runs/sharp_bce --mode eval

--config is an experiment file, or the name of one fvae ships (sharp_bce, mse_dh32,
mse_dh2, keras_dh2, sigma_vae, binarized_nll, cb; `fvae list` shows them). Flags only;
everything else is in the config (see fvae/configs.py).
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fvae import configs, cpu, logs, runs, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for this run's config, metrics, "
                    "checkpoints and figures.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "plot"],
                  "train: train (resuming if the workdir has checkpoints); eval: evaluate "
                  "the best checkpoint on the test split into workdir/eval.json; plot: "
                  "write every figure of the best checkpoint to workdir/figures/.")
flags.mark_flags_as_required(["config", "workdir"])

USER_ERRORS = runs.USER_ERRORS  # a user's mistake: one line, no traceback


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, after finding a packaged experiment named by --config and
    checking that the --config.KEY overrides name real keys."""
    try:
        argv = configs.resolve_config_flag(argv)
        configs.check_override_flags(argv)
        return app.parse_flags_with_usage(argv)
    except (configs.ConfigError, SyntaxError) as e:
        logs.exit_for_user_error("fvae-train", e)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        run_mode(configs.validate(FLAGS.config))
    except USER_ERRORS as e:
        logs.exit_for_user_error("fvae-train", e)
    except KeyboardInterrupt:  # a second Ctrl-C stops at once (the first saves first)
        logs.exit_interrupted("fvae-train")


def run_mode(config) -> None:
    cpu.restart_with_huge_pages(config.runtime)  # first: it starts this process over
    logs.show_own_info(__file__)
    # before any JAX computation: multi-host start-up, CPU devices and XLA:CPU flags
    cpu.setup(config.runtime, (config.train.batch_size, config.runtime.eval_batch_size))
    if FLAGS.mode == "train":
        try:
            train.train_and_evaluate(config, FLAGS.workdir)
        except train.TrainingInterrupted as e:
            logging.warning("%s", e)
            sys.exit(128 + e.signum)
    elif FLAGS.mode == "eval":
        results = runs.evaluate_run(FLAGS.workdir, "best", config=config)
        print(json.dumps({k: v for k, v in results.items() if not isinstance(v, list)},
                         indent=2))
    elif FLAGS.mode == "plot":
        for path in runs.write_run_figures(FLAGS.workdir, data_dir=config.data.dir,
                                           num_images=config.report.num_figure_images or 16):
            print(path)


def run() -> None:
    """The fvae-train command (and launch.py): its --help shows this module's examples."""
    logs.show_flags_in_help(__name__)
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
