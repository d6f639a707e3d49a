"""Where a training step's time goes, op by op: the study's model traced with JAX's
profiler, each compiled op's time per step with the layer it belongs to.

    python -m fvae.bench.profile                       # fvae's defaults, batch 128
    python -m fvae.bench.profile --conv3x3 xla --top 40

Runs a few steps of the step that fvae.bench times (random images resident on the
device), then --steps more under `jax.profiler.trace`, and prints the ops that took the
most time: `ffi_call` rows are fvae's kernels, `ynn_fusion` and the other fusions XLA's.
The first thing to run on a CPU where fvae is slow: it says whether the time goes to
the kernels, to XLA's convolutions or to everything else.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import tempfile


def op_layers(hlo_text: str) -> dict[str, str]:
    """{HLO instruction name: the op_name metadata (the layer) it was compiled from}."""
    found = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%([\w.-]+) = .*op_name=\"([^\"]+)\"", line)
        if match:
            found[match.group(1)] = match.group(2).split("/", 1)[-1]
    return found


def op_times(trace_dir: str) -> collections.Counter:
    """{event name: total microseconds} of the complete events of the trace."""
    [path] = pathlib.Path(trace_dir).rglob("*.trace.json.gz")
    events = json.load(gzip.open(path))
    events = events.get("traceEvents", []) if isinstance(events, dict) else events
    totals = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and not event["name"].startswith(("$", "ThunkExecutor")):
            totals[event["name"]] += event.get("dur", 0)
    return totals


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conv3x3", default="fvae", choices=("fvae", "xla"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    from fvae import configs, cpu
    cpu.restart_with_huge_pages(configs.get_base_config().runtime)  # as training runs
    from fvae.bench import training
    spec = {"model": "conv", "latent_dim": 32, "upsample": "subpixel", "devices": 1,
            "batch_size": args.batch_size, "num_images": 16 * args.batch_size,
            "steps_per_dispatch": 1, "conv3x3": args.conv3x3}
    config = training.bench_config(spec)
    cpu.setup(config.runtime, (args.batch_size,))
    import jax

    from fvae import parallel, train
    dp = parallel.make_data_parallel(1, "auto")
    chunk, state, inputs, _ = training.step_inputs(config, spec, dp,
                                                   train.training_model(config, dp))
    for _ in range(3):  # compile, measure the kernels, warm up
        state, _ = chunk(state, *inputs, num_steps=1)
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                state, _ = chunk(state, *inputs, num_steps=1)
            jax.block_until_ready(state)
        totals = op_times(trace_dir)
    layers = op_layers(chunk.lower(state, *inputs, num_steps=1).compile().as_text())
    per_step = {name: us / args.steps / 1e3 for name, us in totals.items()}
    kinds = collections.Counter()
    for name, ms in per_step.items():
        kinds[re.sub(r"[.\d]+$", "", name)] += ms
    print(f"{cpu.cpu_description()}: batch {args.batch_size}, cpu_conv3x3={args.conv3x3}; "
          f"ms per step, of {sum(per_step.values()):.1f} ms of ops\n\n"
          "| op | ms | layer |\n|---|---|---|")
    for name, ms in sorted(per_step.items(), key=lambda item: -item[1])[:args.top]:
        print(f"| {name} | {ms:.2f} | {layers.get(name, '')[:90]} |")
    print("\n| kind of op | ms |\n|---|---|")
    for kind, ms in kinds.most_common(8):
        print(f"| {kind} | {ms:.1f} |")


if __name__ == "__main__":
    main()
