"""The training-step benchmark (`fvae-bench`, `python -m fvae.bench`): images/s, compile time, peak memory, useful GFLOP/s.

    python -m fvae.bench                                  # the study's model, defaults
    python -m fvae.bench --models conv,keras --batch-sizes 64,128,256 --devices 1,2
    python -m fvae.bench --upsample subpixel,conv_transpose --reference torch,keras
    python -m fvae.bench --seeds 1,2 --devices 1          # vmapped seeds (fvae.sweep)
    python -m fvae.bench --devices 2 --reduce host,xla    # how gradients cross devices
    python -m fvae.bench --cpu-convolutions eigen,xla_default  # XLA:CPU's conv kernels
    python -m fvae.bench --cpu-conv3x3 fvae,xla  # fvae's own conv kernels or XLA's
    python -m fvae.bench --huge-pages true,false          # runtime.huge_pages (Linux)
    python -m fvae.bench --reference keras --rounds 3     # median of 3 interleaved rounds
    python -m fvae.bench --epochs --seeds 1,4             # whole epochs, evaluation included

Each configuration runs in its own subprocess (so the number of CPU devices can
differ and peak memory is that configuration's own) on random uint8 images resident
on the device, exactly as training does. "Useful" FLOPs count only the multiply-adds
of the model as written (a transposed conv's 9 taps per input pixel), whatever
formulation computes them, times 3 for forward plus backward; the IWAE timing's count
one encoding per image and one decoding per draw, forward only. With --epochs, each fvae
configuration also trains for real (fvae.train, on random images written as IDX files:
steps, the test-set evaluation, checkpoints) and reports one steady-state epoch's wall
time and its evaluation's. Results are printed as
a table and written as JSON. Timings on shared machines are noisy: compare rows from
one invocation, best with --rounds, which interleaves the configurations.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import pathlib
import resource
import subprocess
import sys
import time
from typing import Any

TRAIN_FLOPS_PER_MAC = 2 * 3  # a multiply-add is 2 FLOPs; backward costs ~2x forward


def useful_macs(model_config) -> tuple[int, int]:
    """Forward multiply-adds per 28x28 image of the model the config names: (encoder,
    decoder), the decoder's counted once per latent it decodes."""
    latent = model_config.latent_dim
    if model_config.name == "keras":
        enc = [(14 * 14, 9 * 1 * 32), (7 * 7, 9 * 32 * 64), (1, 3136 * 16), (1, 16 * 2 * latent)]
        dec = [(1, latent * 3136), (7 * 7, 9 * 64 * 64), (14 * 14, 9 * 64 * 32),
               (28 * 28, 9 * 32 * 1)]
        return sum(a * b for a, b in enc), sum(a * b for a, b in dec)
    w, strides = list(model_config.encoder_widths), list(model_config.encoder_strides)
    encoder, size, channels = 0, 28, 1
    for width, stride in zip(w, strides):
        size = math.ceil(size / stride)
        encoder += size * size * 9 * channels * width
        channels = width
    encoder += size * size * channels * model_config.encoder_dense
    encoder += model_config.encoder_dense * 2 * latent
    d = list(model_config.decoder_widths)
    decoder, size = latent * 7 * 7 * d[0], 7
    for cin, cout in zip(d, d[1:]):
        decoder += size * size * 9 * cin * cout  # transposed conv: 9 taps per input pixel
        size *= 2
    decoder += model_config.num_res_blocks * 2 * size * size * 9 * d[-1] * d[-1]
    decoder += size * size * 9 * d[-1]
    return encoder, decoder


def useful_macs_per_image(model_config) -> int:
    """Forward multiply-adds per 28x28 image, encoder and decoder."""
    return sum(useful_macs(model_config))


def peak_memory_mb() -> float:
    """Peak resident memory of this process, plus the device's peak on accelerators."""
    import jax
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**20 or rss


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Measured fp32 matmul throughput of the default device: the roofline to quote."""
    import jax
    a = jax.random.normal(jax.random.key(0), (n, n))
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def matmul_peak_in_child() -> float:
    """matmul_peak_gflops in a fresh process, as every configuration is timed."""
    result = subprocess.run(
        [sys.executable, "-c", "import json; from fvae.bench.training import "
         "matmul_peak_gflops as p; print(json.dumps(p()))"], capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"measuring the matmul peak failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout)


def bench_config(spec: dict[str, Any]):
    """The base config with the spec's model, batch size, devices and kernels."""
    from fvae import configs
    config = configs.get_base_config()
    config.model.name, config.model.latent_dim = spec["model"], spec["latent_dim"]
    config.model.upsample = spec["upsample"]
    config.train.batch_size = spec["batch_size"]
    config.runtime.num_devices = spec["devices"]
    config.runtime.cross_device_reduce = spec.get("reduce", "auto")
    config.runtime.cpu_conv3x3 = spec.get("conv3x3", "fvae")
    config.runtime.steps_per_dispatch = spec.get("steps_per_dispatch", 0)
    return config


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Times the training step for one spec (runs in a fresh process)."""
    from fvae import configs, cpu

    config = bench_config(spec)
    config.runtime.cpu_devices = spec["devices"]
    config.runtime.cpu_convolutions = spec.get("cpu_convolutions") or "eigen"
    cpu.setup(config.runtime, (config.train.batch_size,))  # as launch.py, before JAX starts
    import jax

    from fvae import parallel, train

    if jax.default_backend() != "cpu":  # --devices counts CPU devices; use the accelerators
        spec = {**spec, "devices": min(spec["devices"], jax.device_count())}
        config.runtime.num_devices = spec["devices"]
    dp = parallel.make_data_parallel(spec["devices"], spec.get("reduce", "auto"))
    model = train.training_model(config, dp)
    chunk, state, inputs, per_call = step_inputs(config, spec, dp, model)
    seconds, calls, compile_s, faults = _time_chunk(chunk, state, inputs, per_call,
                                                    spec["steps"])
    steps_timed = calls * per_call
    images_per_sec = steps_timed * config.train.batch_size * spec.get("seeds", 1) / seconds
    flops = useful_macs_per_image(config.model) * TRAIN_FLOPS_PER_MAC
    result = {**spec, "steps_per_dispatch": per_call,  # as resolved for the platform
              "reduce": "host" if dp.host_reduce else "xla" if dp.num_devices > 1 else "",
              "framework": "jax", "backend": jax.default_backend(),
              "device_kind": jax.devices()[0].device_kind, "compile_s": compile_s,
              "images_per_sec": images_per_sec, "ms_per_step": 1000 * seconds / steps_timed,
              "useful_mflop_per_image": flops / 1e6,
              "useful_gflops": images_per_sec * flops / 1e9,
              "peak_memory_mb": peak_memory_mb(),  # the step's, before IWAE and epochs
              "page_faults_per_step": faults / steps_timed}
    if jax.default_backend() == "cpu" and config.runtime.cpu_conv3x3 == "fvae" \
            and not dp.partitioned_by_xla:  # (XLA's partitioner runs XLA's convs)
        result["kernel_choices"] = cpu.kernel_choices()  # as measured on this machine
    if spec.get("iwae_samples"):
        result.update(time_iwae(model, config, spec))
    if spec.get("epochs"):
        result.update(time_epochs(config, spec))
    return result


def step_inputs(config, spec: dict[str, Any], dp, model):
    """The compiled chunk of steps training runs, its state and inputs (random images
    resident on the device, spec['seeds'] seeds stacked), and the steps per call."""
    import jax
    import numpy as np

    from fvae import keys, losses, steps

    seeds, batch, num_images = spec.get("seeds", 1), spec["batch_size"], spec["num_images"]
    steps_per_epoch = num_images // batch
    held = steps.Seeds(seeds)  # as train holds them: stacked if several
    state = dp.replicate(held.stack(
        [steps.create_train_state(config, model, jax.random.key(s), 10_000)
         for s in range(seeds)]))
    step_fn = steps.make_train_step(model, config.loss, losses.make_beta_schedule(
        config.loss, steps_per_epoch, 10_000))
    chunk = steps.make_train_chunk(step_fn, batch, steps_per_epoch, dp, seeds)
    images = dp.replicate(np.random.default_rng(0).integers(0, 256, (num_images, 28, 28),
                                                            dtype=np.uint8))
    perm = dp.replicate(held.stack(
        [keys.epoch_permutation(jax.random.key(100 + s), 0, num_images) for s in range(seeds)]))
    key = dp.replicate(held.stack([jax.random.key(200 + s) for s in range(seeds)]))
    per_call = spec["steps_per_dispatch"] or steps.default_steps_per_dispatch(steps_per_epoch)
    return chunk, state, (images, perm, key), per_call


def _time_chunk(chunk, state, inputs, per_call: int, num_steps: int):
    """(seconds, calls, compile seconds, minor page faults) of timed calls of the chunk,
    after one compiling call and two warm-up calls."""
    import jax

    t = time.perf_counter()
    state, _ = chunk(state, *inputs, num_steps=per_call)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t
    for _ in range(2):  # warm-up
        state, _ = chunk(state, *inputs, num_steps=per_call)
    jax.block_until_ready(state)
    calls = max(1, num_steps // per_call)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    for _ in range(calls):
        state, _ = chunk(state, *inputs, num_steps=per_call)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - t
    return seconds, calls, compile_s, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def time_iwae(model, config, spec: dict[str, Any]) -> dict[str, Any]:
    """Times evaluation's heavy part, the IWAE bound (fvae.evaluate.likelihood_bounds,
    K = spec['iwae_samples'] draws of spec['iwae_images'] images, decoded as
    `--mode eval` decodes them, across the row's devices)."""
    import jax
    import numpy as np

    from fvae import evaluate, models, parallel

    params = models.init_params(model, jax.random.key(0))
    images = np.random.default_rng(1).integers(0, 256, (spec["iwae_images"], 28, 28, 1),
                                               dtype=np.uint8)
    devices = parallel.local_devices(config.runtime.num_devices)
    bounds = lambda: evaluate.likelihood_bounds(  # noqa: E731
        model, params, config.loss, images, jax.random.key(2), spec["iwae_samples"],
        devices=devices)
    bounds()  # compiles
    t = time.perf_counter()
    bounds()
    seconds = time.perf_counter() - t
    encoder, decoder = useful_macs(config.model)  # one encoding per image, K decodings
    macs = spec["iwae_images"] * (encoder + spec["iwae_samples"] * decoder)
    return {"iwae_seconds": seconds,
            "iwae_draws_per_sec": spec["iwae_samples"] * spec["iwae_images"] / seconds,
            "iwae_useful_gflops": 2 * macs / seconds / 1e9}


def throughput(config, steps: int = 6, iwae_samples: int = 100) -> dict[str, float]:
    """This machine's training images/s and IWAE draws/s for the config's model, batch
    size, devices and kernels (a few steps on random images, after compiling): what a
    sweep's cost estimate rests on. Call after cpu.setup, as training does."""
    from fvae import parallel, train

    dp = parallel.make_data_parallel(config.runtime.num_devices,
                                     config.runtime.cross_device_reduce)
    model = train.training_model(config, dp)
    spec = {"seeds": 1, "batch_size": config.train.batch_size, "steps_per_dispatch": 1,
            "num_images": 4 * config.train.batch_size, "iwae_samples": iwae_samples,
            "iwae_images": 8}
    chunk, state, inputs, per_call = step_inputs(config, spec, dp, model)
    seconds, calls, _, _ = _time_chunk(chunk, state, inputs, per_call, steps)
    iwae = time_iwae(model, config, spec)
    return {"train_images_per_sec": calls * per_call * config.train.batch_size / seconds,
            "iwae_draws_per_sec": iwae["iwae_draws_per_sec"]}


EPOCHS_RUN = 3  # the first compiles; the period from the second's end to the third's is timed


def time_epochs(config, spec: dict[str, Any]) -> dict[str, Any]:
    """One steady-state epoch of a real training run (fvae.train: the steps, the test-set
    evaluation with its per-epoch image metrics, the checkpoints) on spec['num_images']
    random training images and spec['test_images'] test images, for spec['seeds'] seeds
    (vmapped as fvae.sweep trains them)."""
    import tempfile

    import numpy as np

    from fvae import data, train
    from fvae.writer import read_metrics

    rng = np.random.default_rng(3)
    arrays = {}
    # --num-images to train on after the validation split (--test-images, evaluated
    # each epoch) is held out of the training files
    for split, n in (("train", spec["num_images"] + spec["test_images"]),
                     ("test", spec["test_images"])):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 10, n, dtype=np.uint8)
    with tempfile.TemporaryDirectory(prefix="fvae-bench-") as tmp:
        tmp = pathlib.Path(tmp)
        data.write_files(tmp, arrays)
        config = config.copy_and_resolve_references()
        config.data.dir, config.data.download = str(tmp), False
        config.data.verify_checksums = False  # random images, not the published files
        config.data.validation_size = spec["test_images"]
        config.train.num_epochs, config.report.progress_bar = EPOCHS_RUN, False
        config.report.num_figure_images, config.logging.writers = 0, ()
        runs = []
        for seed in range(spec.get("seeds", 1)):
            runs.append(config.copy_and_resolve_references())
            runs[-1].seed = seed
        workdirs = [tmp / f"seed{seed}" for seed in range(len(runs))]
        t = time.perf_counter()
        train.train_seeds(runs, workdirs)
        total = time.perf_counter() - t
        evals = [[r for r in read_metrics(w) if r["split"] == "validation"] for w in workdirs]
    return {"epoch_seconds": evals[0][-1]["wall_time"] - evals[0][-2]["wall_time"],
            # every seed's evaluation (one after another) falls in the timed epoch
            "epoch_eval_seconds": sum(e[-2]["eval_seconds"] for e in evals),
            "epochs_run_seconds": total}


def run_child(spec: dict[str, Any], module: str = "fvae.bench") -> dict[str, Any]:
    """Runs one spec in a fresh process: with huge pages or not as the spec says (as
    launch.py would restart itself), references in this process's environment."""
    from fvae import cpu
    cmd = [sys.executable, "-m", module, "--child", json.dumps(spec)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    if spec.get("huge_pages") is not None:
        env = cpu.with_huge_pages(env, spec["huge_pages"])
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [l for l in result.stdout.splitlines() if l.startswith("{")]
    if result.returncode or not lines:
        return {**spec, "error": result.stderr.strip().splitlines()[-1:] or ["no output"]}
    return json.loads(lines[-1])


REFERENCE_MODULES = {"keras": "fvae.bench.keras_reference",
                     "torch": "fvae.bench.torch_reference",
                     "torch_compile": "fvae.bench.torch_reference"}


def reference_spec(framework: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {**spec, "framework": framework, "upsample": "conv_transpose", "devices": 1,
            "seeds": 1, "cpu_convolutions": "", "conv3x3": "", "huge_pages": None}


def jax_specs(base: dict[str, Any], args) -> list[dict[str, Any]]:
    """The fvae configurations to time for one model and batch size: every combination
    of the command line's axes (--reduce only where there are several devices)."""
    specs = []
    for upsample in args.upsample.split(","):
        for convs, conv3x3, huge in itertools.product(args.cpu_convolutions.split(","),
                                                       args.cpu_conv3x3.split(","),
                                                       args.huge_pages.split(",")):
            for devices in map(int, args.devices.split(",")):
                for reduce in args.reduce.split(",") if devices > 1 else ["auto"]:
                    for seeds in map(int, args.seeds.split(",")):
                        specs.append({**base, "upsample": upsample, "cpu_convolutions": convs,
                                      "conv3x3": conv3x3,
                                      "huge_pages": {"true": True, "false": False}[huge],
                                      "devices": devices, "seeds": seeds, "reduce": reduce})
    return specs


YES_NO = {True: "yes", False: "no"}


def format_table(rows: list[dict[str, Any]], peak: float) -> str:
    head = ("| framework | model | latent | upsample | CPU convs | 3x3 convs | huge pages | batch "
            "| devices | seeds | images/s | ms/step | compile s | peak MB | useful GFLOP/s "
            "| % of matmul peak | IWAE draws/s (% of peak) | s/epoch (eval s) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    out = [head]
    for r in rows:
        devices = f"{r['devices']}{' ' + r['reduce'] if r.get('reduce') else ''}"
        first = (f"| {r.get('framework', 'jax')} | {r['model']} | {r['latent_dim']} | "
                 f"{r['upsample']} | {r.get('cpu_convolutions', '')} | {r.get('conv3x3', '')} | "
                 f"{YES_NO.get(r.get('huge_pages'), '')} | {r['batch_size']} | "
                 f"{devices} | {r.get('seeds', 1)} | ")
        if "error" in r:
            out.append(f"{first}error: {r['error'][0][:60]} |" + "|" * 7)
            continue
        rounds = r.get("rounds_images_per_sec", [])
        spread = f" ({min(rounds):.0f}-{max(rounds):.0f})" if len(rounds) > 1 else ""
        iwae = f"{r['iwae_draws_per_sec']:.0f} ({100 * r['iwae_useful_gflops'] / peak:.0f}%)" \
            if "iwae_draws_per_sec" in r else ""
        epoch = f"{r['epoch_seconds']:.1f} ({r['epoch_eval_seconds']:.1f})" \
            if "epoch_seconds" in r else ""
        out.append(f"{first}{r['images_per_sec']:.0f}{spread} | {r['ms_per_step']:.1f} | "
                   f"{r.get('compile_s', float('nan')):.1f} | {r['peak_memory_mb']:.0f} | "
                   f"{r['useful_gflops']:.1f} | {100 * r['useful_gflops'] / peak:.1f} | "
                   f"{iwae} | {epoch} |")
    return "\n".join(out)


def median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's result over several rounds: the round with the median
    images/s (the lower of the middle two for an even count), with every round's
    images/s in `rounds_images_per_sec`; the first error if no round succeeded."""
    ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["images_per_sec"])
    if not ok:
        return runs[0]
    return {**ok[(len(ok) - 1) // 2],
            "rounds_images_per_sec": [r["images_per_sec"] for r in runs if "error" not in r]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="conv")
    parser.add_argument("--latent-dims", default="32")
    parser.add_argument("--batch-sizes", default="128")
    parser.add_argument("--devices", default="1,2", help="CPU devices (ignored on GPU)")
    parser.add_argument("--upsample", default="subpixel,conv_transpose")
    parser.add_argument("--reduce", default="auto",
                        help="gradient sum across devices: auto, host, xla (fvae.parallel)")
    parser.add_argument("--cpu-convolutions", default="eigen",
                        help="XLA:CPU's convolutions: eigen, xla_default (fvae/cpu)")
    parser.add_argument("--cpu-conv3x3", default="fvae",
                        help="3x3 convolutions and transposed convolutions on CPU: fvae, xla "
                             "(fvae.cpu)")
    parser.add_argument("--huge-pages", default="true",
                        help="true, false: runtime.huge_pages, glibc's malloc asking for "
                             "transparent huge pages (fvae/cpu/process.py)")
    parser.add_argument("--seeds", default="1",
                        help="runs trained together as one vmapped step (images/s counts all)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--steps-per-dispatch", type=int, default=0,
                        help="training steps per compiled call; 0: as training does (one on "
                             "CPU, an epoch elsewhere: runtime.steps_per_dispatch)")
    parser.add_argument("--num-images", type=int, default=60_000)
    parser.add_argument("--iwae-samples", type=int, default=0,
                        help="also time the IWAE bound of evaluation with K draws per image "
                             "(fvae rows; 0: no)")
    parser.add_argument("--iwae-images", type=int, default=64)
    parser.add_argument("--epochs", action="store_true",
                        help=f"also time whole epochs (fvae rows): {EPOCHS_RUN} epochs on "
                             "--num-images random images, --test-images validation images "
                             "scored each epoch; reports the last epoch's seconds")
    parser.add_argument("--test-images", type=int, default=10_000)
    parser.add_argument("--reference", default="",
                        help="comma-separated: keras, torch, torch_compile (needs tensorflow "
                             "/ torch installed)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every configuration this many times, round-robin, and "
                             "report the median: on a shared machine, load that comes and "
                             "goes then falls on all of them alike")
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not set(args.huge_pages.split(",")) <= {"true", "false"}:
        parser.error(f"--huge-pages={args.huge_pages}: use true, false or true,false")
    if args.child:
        print(json.dumps(run_one(json.loads(args.child))))
        return

    peak = matmul_peak_in_child()
    specs = []  # (spec, module that times it)
    for model in args.models.split(","):
        for latent in map(int, args.latent_dims.split(",")):
            for batch in map(int, args.batch_sizes.split(",")):
                base = {"model": model, "latent_dim": latent, "batch_size": batch,
                        "steps": args.steps, "steps_per_dispatch": args.steps_per_dispatch,
                        "num_images": args.num_images}
                specs += [(reference_spec(framework, base), REFERENCE_MODULES[framework])
                          for framework in filter(None, args.reference.split(","))]
                timings = {"iwae_samples": args.iwae_samples, "iwae_images": args.iwae_images,
                           "epochs": args.epochs, "test_images": args.test_images}
                specs += [({**spec, **timings}, "fvae.bench") for spec in jax_specs(base, args)]
    runs = [[] for _ in specs]
    for round_index in range(args.rounds):
        for (spec, module), spec_runs in zip(specs, runs):
            spec_runs.append(run_child(spec, module))
            line = format_table(spec_runs[-1:], peak).splitlines()[-1]
            print(f"{line} round {round_index + 1}" if args.rounds > 1 else line, flush=True)
    rows = [median_round(spec_runs) for spec_runs in runs]
    from fvae import provenance
    record = provenance.record()  # this process's; each row has its own runtime settings
    table, cpu = format_table(rows, peak), record["machine"]["cpu"]
    print(f"\n{cpu}; measured fp32 matmul peak: {peak:.0f} GFLOP/s\n\n{table}")
    pathlib.Path(args.out).write_text(json.dumps(
        {"matmul_peak_gflops": peak, "cpu": cpu, "results": rows, "provenance": record},
        indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
