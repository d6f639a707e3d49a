"""What the reference benchmarks share: the spec protocol and the result record."""

import json
import resource
import sys
import time


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(step, batches, steps: int, warmup: int = 3) -> tuple[float, float]:
    """(seconds of the first call, seconds per step over `steps` timed calls)."""
    t = time.perf_counter()
    step(batches[0])
    first = time.perf_counter() - t
    for i in range(warmup):
        step(batches[(i + 1) % len(batches)])
    t = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    return first, (time.perf_counter() - t) / steps


def report(spec: dict, framework: str, first_s: float, step_s: float, device: str) -> None:
    from fvae import configs
    from fvae.bench import training as bench
    config = configs.get_base_config()
    config.model.name, config.model.latent_dim = spec["model"], spec["latent_dim"]
    flops = bench.useful_macs_per_image(config.model) * bench.TRAIN_FLOPS_PER_MAC
    ips = spec["batch_size"] / step_s
    print(json.dumps({**spec, "framework": framework, "backend": device,
                      "compile_s": first_s, "images_per_sec": ips, "ms_per_step": 1000 * step_s,
                      "useful_mflop_per_image": flops / 1e6, "useful_gflops": ips * flops / 1e9,
                      "peak_memory_mb": peak_rss_mb()}))


def spec_from_argv() -> dict:
    return json.loads(sys.argv[sys.argv.index("--child") + 1])
