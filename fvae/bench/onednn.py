"""oneDNN's convolutions against the measured dispatch's choice, layer by layer: would
calling oneDNN (through jax.ffi) beat fvae's kernels?

    ONEDNN_VERBOSE=1 python -m fvae.bench.onednn --out docs/onednn.json  # (prints oneDNN's kernels)

PyTorch's CPU convolutions are oneDNN's (`torch.backends.mkldnn`; ONEDNN_VERBOSE=1
prints each primitive it runs, e.g. brg_conv_fwd:avx512_core), so timing PyTorch's
convolution, or its gradient, on each layer shape of the study's training step, in
channels-last layout, times oneDNN's kernel for it plus PyTorch's small per-call
overhead: an upper bound on what an FFI call to oneDNN would take. Beside it, the
same process measures fvae's candidates and XLA on the same shapes
(fvae.bench.kernels), so the ratios come from one sitting. Needs the `reference`
extra (torch).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def onednn_ms(layer: str, repeats: int = 5) -> float:
    """PyTorch's (oneDNN's) best time in ms for the dispatch layer key `layer`."""
    import torch
    op, *shapes = layer.split()
    first, second = (tuple(int(d) for d in s.split("x")) for s in shapes[:2])
    nchw = lambda shape, grad=False: torch.randn(  # noqa: E731 (NHWC shape, NCHW tensor)
        shape[0], shape[3], shape[1], shape[2]).to(memory_format=torch.channels_last) \
        .requires_grad_(grad)
    transposed = op.startswith("conv_transpose")
    conv = (lambda x, w: torch.nn.functional.conv_transpose2d(
        x, w, stride=2, padding=1, output_padding=1)) if transposed else \
        (lambda x, w: torch.nn.functional.conv2d(x, w, padding=1))

    def weight(c_in, c_out, grad=False):  # conv2d: (O, I, 3, 3); conv_transpose2d: (I, O, 3, 3)
        shape = (c_in, c_out, 3, 3) if transposed else (c_out, c_in, 3, 3)
        return torch.randn(shape).to(memory_format=torch.channels_last).requires_grad_(grad)

    if op.endswith("weight_grad"):  # (x, dy)
        x, w = nchw(first), weight(first[3], second[3], grad=True)
        dy = nchw(second)
        run = lambda: torch.autograd.grad(conv(x, w), w, dy)  # noqa: E731
    elif op == "conv_transpose_input_grad":  # (dy, kernel (3, 3, C, O))
        x = nchw((first[0], first[1] // 2, first[2] // 2, second[2]), grad=True)
        w, dy = weight(second[2], second[3]), nchw(first)
        run = lambda: torch.autograd.grad(conv(x, w), x, dy)  # noqa: E731
    elif op.endswith("relu"):  # a layer: + bias (+ residual), ReLU, as PyTorch runs it
        x, w, b = nchw(first), weight(second[2], second[3]), torch.randn(second[3])
        residual = nchw((*first[:3], second[3])) if op == "conv3x3_bias_add_relu" else 0
        run = lambda: torch.relu(conv(x, w) + b[:, None, None] + residual)  # noqa: E731
    else:  # a forward convolution (x, kernel (3, 3, C, O)); conv3x3 input grads are these
        x, w = nchw(first), weight(second[2], second[3])
        run = lambda: conv(x, w)  # noqa: E731
    with torch.no_grad() if not op.endswith("grad") else torch.enable_grad():
        for _ in range(2):
            run()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
    return 1e3 * best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    from fvae import configs, cpu
    cpu.restart_with_huge_pages(configs.get_base_config().runtime)  # as training runs
    import torch
    torch.set_num_threads(os.cpu_count())
    from fvae.bench import kernels
    report = kernels.measure_layers("conv", args.batch_size)
    rows = ["| layer | oneDNN (PyTorch) ms | fvae's choice | its ms | XLA ms | oneDNN / choice time |",
            "|---|---|---|---|---|---|"]
    totals = {"onednn": 0.0, "choice": 0.0, "xla": 0.0}
    for layer, record in report["layers"].items():
        record["onednn_ms"] = onednn_ms(layer)
        chosen = record["ms"][record["choice"]]
        for name, ms in (("onednn", record["onednn_ms"]), ("choice", chosen),
                         ("xla", record["ms"]["xla"])):
            totals[name] += ms
        rows.append(f"| {layer} | {record['onednn_ms']:.2f} | {record['choice']} | "
                    f"{chosen:.2f} | {record['ms']['xla']:.2f} | "
                    f"{record['onednn_ms'] / chosen:.2f} |")
    rows.append(f"| **all layers** | **{totals['onednn']:.1f}** | | **{totals['choice']:.1f}** "
                f"| **{totals['xla']:.1f}** | **{totals['onednn'] / totals['choice']:.2f}** |")
    report.update(cpu=cpu.cpu_description(), torch=torch.__version__, totals_ms=totals,
                  onednn=torch.backends.mkldnn.is_available())
    print(f"{report['cpu']}, torch {torch.__version__} (oneDNN available: "
          f"{report['onednn']}), batch {args.batch_size}\n\n" + "\n".join(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
