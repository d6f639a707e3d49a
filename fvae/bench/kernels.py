"""fvae's CPU convolution kernels against XLA's, one study-sized layer at a time.

    python -m fvae.bench.kernels                         # the host's own register tiles
    python -m fvae.bench.kernels --tiles 8,4,3,3,16,2,14,8   # other tile sets too

Times each of the study model's convolutions (batch 128) by fvae's kernels
(fvae/cpu/kernels.py) and by XLA:CPU (Eigen convolutions, as training runs them), best of
--repeats calls after warm-up, and prints ms and GFLOP/s. `--tiles` takes tile sets
"lanes,vectors,pixels,inputs" (FVAE_TILES in fvae/cpu/csrc/conv3x3.cc), four numbers each,
and runs each in its own process: the way to size the tiles for a new instruction set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

BATCH = 128
# name: (x shape, kernel shape, kind); kinds: conv (3x3 stride 1), conv_wgrad, convT,
# convT_dgrad, convT_wgrad (the decoder's 3x3 stride-2 transposed convs)
LAYERS = {
    "residual conv 28x28x32": ((BATCH, 28, 28, 32), (3, 3, 32, 32), "conv"),
    "residual conv, weight grad": ((BATCH, 28, 28, 32), (3, 3, 32, 32), "conv_wgrad"),
    "upsample 7->14, 128->64": ((BATCH, 7, 7, 128), (3, 3, 128, 64), "convT"),
    "upsample 7->14, weight grad": ((BATCH, 7, 7, 128), (3, 3, 128, 64), "convT_wgrad"),
    "upsample 14->28, 64->32": ((BATCH, 14, 14, 64), (3, 3, 64, 32), "convT"),
    "upsample 14->28, input grad": ((BATCH, 14, 14, 64), (3, 3, 64, 32), "convT_dgrad"),
    "upsample 14->28, weight grad": ((BATCH, 14, 14, 64), (3, 3, 64, 32), "convT_wgrad"),
}


def best_ms(fn, *args, repeats: int) -> float:
    import jax
    fn = jax.jit(fn)
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return 1e3 * best


def time_layers(repeats: int) -> dict:
    """{layer: (fvae ms, xla ms, GFLOP)} for the host's tiles (or FVAE_KERNEL_TILES)."""
    from fvae import configs, cpu
    cpu.configure_cpu_convolutions(configs.get_base_config().runtime.cpu_convolutions)
    import jax
    import jax.numpy as jnp

    from fvae import models
    cpu_kernels = cpu.kernels

    def xla_conv(x, k):
        return cpu_kernels._xla_conv3x3(x, k)

    def xla_convt(x, k):
        return models.subpixel_conv_transpose(x, k, jnp.zeros(k.shape[3]))

    def pullback(fn, wrt):  # the cotangent map of fn for one argument
        return lambda x, k, dy: jax.vjp(lambda a: fn(*((a, k) if wrt == 0 else (x, a))),
                                        (x, k)[wrt])[1](dy)[0]

    fvae = {"conv": lambda x, k, dy: cpu_kernels.conv3x3_forward(x, k),
            "conv_wgrad": lambda x, k, dy: cpu_kernels.conv3x3_weight_grad(x, dy),
            "convT": lambda x, k, dy: cpu_kernels.conv_transpose_forward(x, k),
            "convT_dgrad": lambda x, k, dy: cpu_kernels.conv_transpose_input_grad(dy, k),
            "convT_wgrad": lambda x, k, dy: cpu_kernels._summed_weight_grad(
                "fvae_conv_transpose3x3s2_weight_grad", x, dy)}
    xla = {"conv": lambda x, k, dy: xla_conv(x, k), "conv_wgrad": pullback(xla_conv, 1),
           "convT": lambda x, k, dy: xla_convt(x, k), "convT_dgrad": pullback(xla_convt, 0),
           "convT_wgrad": pullback(xla_convt, 1)}
    results = {}
    for name, (x_shape, k_shape, kind) in LAYERS.items():
        keys = jax.random.split(jax.random.key(0), 3)
        x, k = jax.random.normal(keys[0], x_shape), 0.1 * jax.random.normal(keys[1], k_shape)
        scale = 2 if kind.startswith("convT") else 1
        dy = jax.random.normal(keys[2], (BATCH, x_shape[1] * scale, x_shape[2] * scale,
                                         k_shape[3]))
        gflop = 2 * BATCH * x_shape[1] * x_shape[2] * 9 * k_shape[2] * k_shape[3] / 1e9
        results[name] = (best_ms(fvae[kind], x, k, dy, repeats=repeats),
                         best_ms(xla[kind], x, k, dy, repeats=repeats), gflop)
    return {"tiles": cpu_kernels.tiles(), "layers": results}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiles", default="",
                        help="tile sets to compile and time besides the host's: four "
                             "comma-separated numbers each, all in one list")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(time_layers(args.repeats)))
        return
    numbers = [n for n in args.tiles.split(",") if n]
    if len(numbers) % 4:
        parser.error(f"--tiles={args.tiles}: four numbers per tile set")
    tile_sets = [None] + [",".join(numbers[i:i + 4]) for i in range(0, len(numbers), 4)]
    for tiles in tile_sets:
        from fvae import cpu
        env = dict(os.environ)
        env.pop(cpu.kernels.TILES_VARIABLE, None)
        if tiles:
            env[cpu.kernels.TILES_VARIABLE] = tiles
        result = subprocess.run([sys.executable, "-m", "fvae.bench.kernels", "--child",
                                 "--repeats", str(args.repeats)], env=env, capture_output=True,
                                text=True)
        if result.returncode:
            sys.exit(result.stderr[-3000:])
        report = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"\ntiles {report['tiles']}{'' if tiles else ' (the host default)'}\n"
              "| layer | fvae ms | XLA ms | fvae GFLOP/s | XLA GFLOP/s | fvae / XLA time |\n"
              "|---|---|---|---|---|---|")
        for name, (ours, theirs, gflop) in report["layers"].items():
            print(f"| {name} | {ours:.2f} | {theirs:.2f} | {gflop / ours * 1e3:.0f} | "
                  f"{gflop / theirs * 1e3:.0f} | {ours / theirs:.2f} |")


if __name__ == "__main__":
    main()
