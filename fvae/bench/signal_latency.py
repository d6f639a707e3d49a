"""How many steps a run trains after SIGTERM: starts a short real-data run, signals it
DELAY seconds after its first epoch line, and prints the step it stopped at.

    python -m fvae.bench.signal_latency --data_dir DIR --delay 4
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--delay", type=float, default=4.0, help="seconds after epoch 1")
    parser.add_argument("--config", default="sharp_bce")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, "-m", "fvae.launch", "--config", args.config,
                   "--workdir", workdir, f"--config.data.dir={args.data_dir}",
                   "--config.data.limit_train=1024", "--config.train.num_epochs=3",
                   "--config.report.progress_bar=False",
                   "--config.report.num_figure_images=0"]
        run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
        lines = []
        for line in run.stdout:
            lines.append(line)
            if line.startswith("epoch 1:"):
                time.sleep(args.delay)
                run.terminate()
                signalled = time.time()
                break
        else:
            sys.exit("the run ended before its first epoch:\n" + "".join(lines[-20:]))
        text = "".join(lines) + run.communicate()[0]
    stopped = re.search(r"stopped by SIGTERM at step (\d+)", text)
    print(f"exit {run.returncode} {time.time() - signalled:.1f} s after the signal; stopped "
          f"at step {stopped.group(1) if stopped else '?'} (epoch 1 ended at step 8)")


if __name__ == "__main__":
    main()
