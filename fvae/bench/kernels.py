"""The measured dispatch, layer by layer: every candidate tile set of fvae's CPU kernels
and XLA's own convolution, timed on each layer of a model's training step.

    python -m fvae.bench.kernels                          # the study's model, batch 128
    python -m fvae.bench.kernels --model keras --out docs/kernels.json
    FVAE_KERNEL_TILES='16,2,14,8;8,4,6,6' python -m fvae.bench.kernels  # other candidates

Traces the gradient of the model's loss (as training does, so every layer shape the
step dispatches is met, forward and backward) with the dispatch measuring every shape
afresh (fvae/cpu/dispatch.py: best of its rounds, candidates interleaved), and prints
each layer's milliseconds per candidate, the choice and its speed-up over XLA. Neither
reads nor writes the machine's table of choices. Also prints what a first run costs:
compiling the candidates (when not cached) and measuring.
"""

from __future__ import annotations

import argparse
import json
import time


def measure_layers(model_name: str, batch: int) -> dict:
    """{"compile_s", "measure_s", "layers": {key: dispatch record}} for the model."""
    from fvae import configs, cpu
    cpu.configure_cpu_convolutions(configs.get_base_config().runtime.cpu_convolutions)
    import jax
    import jax.numpy as jnp

    from fvae import models

    start = time.perf_counter()
    cpu.load_kernels()
    compile_s = time.perf_counter() - start
    model_config = configs.get_base_config().model
    model_config.name = model_name
    model = cpu.accelerate(models.build_model(model_config), "fvae")
    params = models.init_params(model, jax.random.key(0))
    images = jnp.zeros((batch, 28, 28, 1), jnp.float32)
    loss = lambda p: model.apply({"params": p}, images, jax.random.key(1))[0].sum()  # noqa
    with cpu.measuring_kernels_afresh():
        start = time.perf_counter()
        jax.eval_shape(jax.grad(loss), params)
        measure_s = time.perf_counter() - start
        layers = cpu.kernel_records()
    return {"compile_s": round(compile_s, 2), "measure_s": round(measure_s, 2),
            "layers": layers}


def table(report: dict) -> str:
    names = sorted({n for record in report["layers"].values() for n in record["ms"]},
                   key=lambda n: (n == "xla", n))
    lines = [f"| layer | {' | '.join(f'{n} ms' for n in names)} | choice | XLA / choice |",
             "|---|" + "---|" * (len(names) + 2)]
    for layer, record in report["layers"].items():
        ms = record["ms"]
        cells = [f"{ms[n]:.2f}" if n in ms else "dropped" for n in names]
        lines.append(f"| {layer} | {' | '.join(cells)} | {record['choice']} | "
                     f"{ms['xla'] / ms[record['choice']]:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="conv", choices=("conv", "keras"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default="", help="also write the report as JSON here")
    args = parser.parse_args(argv)
    from fvae import configs, cpu
    cpu.restart_with_huge_pages(configs.get_base_config().runtime)  # as training runs
    report = {"cpu": cpu.cpu_description(), "candidates": list(cpu.candidates()),
              "model": args.model, "batch_size": args.batch_size,
              **measure_layers(args.model, args.batch_size)}
    print(f"{report['cpu']}: {args.model} model, batch {args.batch_size}\n\n{table(report)}\n\n"
          f"first run: {report['compile_s']:.1f} s loading the kernels (compiling them "
          f"if not cached), {report['measure_s']:.1f} s measuring {len(report['layers'])} "
          "layer shapes")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
