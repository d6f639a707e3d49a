"""The CPU fast path, applied to a plain Flax model from outside it. The one door to
fvae's CPU-specific code: everything else imports `fvae.cpu`, never its modules.

    model = cpu.accelerate(models.build_model(config.model), config.runtime.cpu_conv3x3)

`accelerate` returns the model with its `apply` run under `nn.intercept_methods`: on
the CPU backend, every layer whose shapes fvae's C++ kernels cover (fvae/cpu/kernels.py,
source in csrc/) is computed by them where they were measured faster than XLA on this
machine (fvae/cpu/dispatch.py), from the layer's own parameters:
  - `nn.Conv` 3x3, stride 1, 'SAME' (any model's), by the conv kernel;
  - `models.ResBlock`, each conv with its bias, ReLU and skip connection in one pass;
  - `models.ConvTransposeReLU` (model.upsample='subpixel'), bias and ReLU in one pass.
Every other layer, another backend, runtime.cpu_conv3x3='xla', or a machine where the
kernels cannot be compiled gets the plain model's XLA computation. Initialisation is
never intercepted, so parameters are exactly the plain model's.

Process start-up (fvae/cpu/process.py): `restart_with_huge_pages` and `setup` (XLA:CPU
flags, the CPU device count, multi-host start-up), before JAX's backends start.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from fvae import configs, models
from fvae.cpu import dispatch, kernels
from fvae.cpu.kernels import candidates, cpu_description, cpu_fingerprint
from fvae.cpu.dispatch import choices as kernel_choices
from fvae.cpu.dispatch import measuring_afresh as measuring_kernels_afresh
from fvae.cpu.dispatch import pin as pin_kernel_choices
from fvae.cpu.dispatch import recording as recording_kernel_choices
from fvae.cpu.dispatch import records as kernel_records
from fvae.cpu.kernels import load as load_kernels
from fvae.cpu.process import (configure_cpu_convolutions, cpu_device_count,
                              huge_pages_restart_env, restart_with_huge_pages, setup,
                              with_huge_pages)

__all__ = ["accelerate", "Accelerated", "candidates", "cpu_description", "cpu_fingerprint",
           "kernel_choices", "recording_kernel_choices", "pin_kernel_choices",
           "measuring_kernels_afresh", "kernel_records", "load_kernels", "setup",
           "restart_with_huge_pages", "huge_pages_restart_env", "with_huge_pages",
           "cpu_device_count", "configure_cpu_convolutions"]


def _conv(module: nn.Conv, next_fun, args, kwargs):
    """nn.Conv by fvae's conv kernel where it covers the convolution (it checks, and
    falls back to XLA's): the same module, its conv function swapped, same params."""
    if module.conv_general_dilated is kernels.conv_general_dilated:
        return next_fun(*args, **kwargs)  # the swapped clone below, running
    clone = module.clone(parent=None, conv_general_dilated=kernels.conv_general_dilated)
    return clone.apply({"params": module.variables["params"]}, *args, **kwargs)


def _res_block(module: models.ResBlock, x):
    """relu(x + Conv_1(relu(Conv_0(x)))), each conv fused with its bias and ReLU."""
    p = module.variables["params"]
    h = kernels.conv3x3_bias_relu(x, p["Conv_0"]["kernel"], p["Conv_0"]["bias"])
    return kernels.conv3x3_bias_relu(h, p["Conv_1"]["kernel"], p["Conv_1"]["bias"], x)


def _upsample(module: models.ConvTransposeReLU, x):
    """relu(the stride-2 transposed conv + bias) in one pass."""
    p = module.variables["params"]
    return kernels.conv_transpose(x, p["kernel"], p["bias"], relu=True)


def _interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or module.is_initializing() or kwargs:
        return next_fun(*args, **kwargs)
    if isinstance(module, models.ResBlock):
        return _res_block(module, *args)
    if isinstance(module, models.ConvTransposeReLU) and module.how == "subpixel":
        return _upsample(module, *args)
    if isinstance(module, nn.Conv) and module.conv_general_dilated_cls is None and \
            module.conv_general_dilated in (None, kernels.conv_general_dilated):
        return _conv(module, next_fun, args, kwargs)  # (not one with its own conv function)
    return next_fun(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class Accelerated:
    """A model whose `apply` computes with fvae's CPU kernels (see the module doc);
    everything else is the plain model's. Hashable, so it can be a static argument."""
    model: nn.Module

    def apply(self, *args, **kwargs) -> Any:
        with nn.intercept_methods(_interceptor):
            return self.model.apply(*args, **kwargs)

    def init(self, *args, **kwargs) -> Any:
        return self.model.init(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "model":  # (not set yet: while copying)
            raise AttributeError(name)
        return getattr(self.model, name)


def accelerate(model: nn.Module, conv3x3: str) -> nn.Module | Accelerated:
    """`model` computing with fvae's CPU kernels (conv3x3='fvae') or as it is ('xla')."""
    if conv3x3 not in configs.CPU_CONV3X3:
        raise ValueError(f"runtime.cpu_conv3x3 must be one of {configs.CPU_CONV3X3}, got "
                         f"{conv3x3!r}")
    return model if conv3x3 == "xla" else Accelerated(model)
