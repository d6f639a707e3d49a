"""fvae's own CPU kernels for 3x3 convolutions and their gradients (`runtime.cpu_conv3x3`).

XLA:CPU (jaxlib 0.10) ran the weight gradients of the study's 28x28x32 residual convs
at about a third of the machine's peak, on transposed copies of their operands: they
were the largest single cost of a training step. `conv_general_dilated` is a drop-in
for `jax.lax.conv_general_dilated` (nn.Conv's `conv_general_dilated` field) that runs
a 3x3, stride-1, 'SAME', float32 NHWC convolution, its input gradient and its weight
gradient with the kernels of fvae/cpu/csrc/conv3x3.cc, called through jax.ffi.
`conv_transpose` is a drop-in for `models.subpixel_conv_transpose`, the decoder's
3x3, stride-2 transposed convolution: its kernels compute only the taps each output
pixel uses, where the sub-pixel 2x2 convolution multiplies 7 zeros in every 16 (and
needs depth-to-space copies). `conv3x3_bias_relu` (the residual blocks' convolutions)
and `conv_transpose(..., relu=True)` (the upsampling layers) add the bias (and the skip
connection) and apply the ReLU as the kernel stores its output, one pass where XLA
makes two or three. Any other convolution, a backend other than the CPU, or a machine
where the kernels cannot be compiled gets XLA's own (the last with one warning).

The C++ source is compiled on first use with the host's compiler (CXX, else c++) for
the host's instruction set, and cached under $FVAE_CACHE_DIR (default
~/.cache/fvae) by a hash of the source, the flags, jaxlib and the CPU.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib

from fvae import models

SOURCE = pathlib.Path(__file__).parent / "csrc" / "conv3x3.cc"
TARGETS = {"fvae_conv3x3": "FvaeConv3x3",  # XLA custom-call target: library symbol
           "fvae_conv3x3_weight_grad": "FvaeConv3x3WeightGrad",
           "fvae_conv3x3_bias_relu": "FvaeConv3x3BiasRelu",
           "fvae_conv3x3_bias_add_relu": "FvaeConv3x3BiasAddRelu",
           "fvae_conv_transpose3x3s2": "FvaeConvTranspose3x3s2",
           "fvae_conv_transpose3x3s2_bias_relu": "FvaeConvTranspose3x3s2BiasRelu",
           "fvae_conv_transpose3x3s2_input_grad": "FvaeConvTranspose3x3s2InputGrad",
           "fvae_conv_transpose3x3s2_weight_grad": "FvaeConvTranspose3x3s2WeightGrad"}
GROUP_IMAGES = 8  # images per partial weight gradient: the unit of work of a thread
LANES = 16  # channel counts the kernels take are multiples of it (kChannelMultiple)
NHWC = models.NHWC


def cache_dir() -> pathlib.Path:
    default = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
    return pathlib.Path(os.environ.get("FVAE_CACHE_DIR", default / "fvae"))


# The kernels size their register tiles for the host's instruction set. This variable
# ("lanes,vectors,pixels,inputs", see FVAE_TILES in conv3x3.cc) compiles another's, so
# that the tests check every instruction set's tiles on any machine.
TILES_VARIABLE = "FVAE_KERNEL_TILES"


def compile_command(source: pathlib.Path, output: pathlib.Path) -> list[str]:
    arch = "-mcpu=native" if platform.machine().lower() in ("arm64", "aarch64") else \
        "-march=native"
    tiles = os.environ.get(TILES_VARIABLE)
    if tiles is not None and not re.fullmatch(r"(4|8|16)(,[1-9][0-9]?){3}", tiles):
        raise ValueError(f"{TILES_VARIABLE}={tiles!r}: expected lanes (4, 8 or 16) and three "
                         f"tile sizes, as in '8,4,3,3'; unset it for the host's own tiles")
    defines = [f"-DFVAE_TILES={tiles}"] if tiles else []
    return [os.environ.get("CXX", "c++"), "-O3", arch, "-std=c++17", "-shared", "-fPIC",
            *defines, f"-I{jax.ffi.include_dir()}", str(source), "-o", str(output)]


def cpu_fingerprint() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({l for l in lines if l.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def cpu_description() -> str:
    """The host CPU's model, core count and widest vector extension, e.g. 'AMD EPYC, 2
    cores, AVX-512': what a speed or a kernel choice measured here holds for."""
    lines = cpu_fingerprint().splitlines()
    field = lambda name: [l.split(":", 1)[1] for l in lines if l.startswith(name)]  # noqa
    model = next((m.strip() for m in field("model name")), platform.processor()
                 or platform.machine())
    flags = {flag for l in field("flags") for flag in l.split()}
    vector = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"),
                                           ("avx", "AVX"), ("asimd", "NEON")) if flag in flags), "")
    return f"{model}, {os.cpu_count()} cores{', ' + vector if vector else ''}"


def library_path() -> pathlib.Path:
    """The compiled kernel, compiling it first if this machine has no cached copy."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([
        source, " ".join(compile_command(SOURCE, pathlib.Path("out"))).encode(),
        jaxlib.version.__version__.encode(), cpu_fingerprint().encode()])).hexdigest()[:16]
    path = cache_dir() / "kernels" / f"conv3x3-{key}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = pathlib.Path(tmp) / path.name
        logging.info("compiling %s", SOURCE.name)
        subprocess.run(compile_command(SOURCE, built), check=True, capture_output=True,
                       text=True)
        os.replace(built, path)  # atomic: processes compiling at once both end well
    return path


@functools.cache
def load() -> bool:
    """Compiles (once per machine) and registers the kernel with XLA; False, after one
    warning, where it cannot be (no C++ compiler, an unsupported one, ...)."""
    try:
        library = _library()
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                        platform="cpu")
        return True
    except (OSError, AttributeError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or e
        logging.warning("fvae's CPU kernels for 3x3 convolutions could not be compiled, so "
                        "XLA's is used (set runtime.cpu_conv3x3='xla' to skip them): %s",
                        str(detail)[-2000:])
        return False


def _library() -> ctypes.CDLL:
    return ctypes.cdll.LoadLibrary(str(library_path()))


def tiles() -> str:
    """The register tiles the kernels were compiled with for this host ("lanes,vectors,
    pixels,inputs"), or '' where they could not be compiled."""
    if not load():
        return ""
    tile_set = _library().FvaeTiles
    tile_set.restype = ctypes.c_char_p
    return tile_set().decode().replace(" ", "")


def _call(target: str, shape: tuple[int, ...], *args: jax.Array,
          vmap_method: str = "broadcast_all") -> jax.Array:
    if not load():
        raise RuntimeError(f"fvae's CPU kernels could not be compiled (see the warning "
                           f"above), so {target} cannot run")
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32),
                            vmap_method=vmap_method)(*args)


def _flip(kernel: jax.Array) -> jax.Array:
    """A 3x3 kernel flipped in space, its in and out channels swapped."""
    return kernel[::-1, ::-1].transpose(0, 1, 3, 2)


def _xla_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=NHWC)


def conv3x3_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A 3x3, stride-1, 'SAME' NHWC convolution: x [B, H, W, C], kernel (3, 3, C, O);
    fvae's kernel when O is a multiple of 16, else XLA's."""
    if kernel.shape[3] % LANES:
        return _xla_conv3x3(x, kernel)
    # vmapped (seeds): one call per kernel, each on every thread
    return _call("fvae_conv3x3", x.shape[:-1] + kernel.shape[3:], x, kernel,
                 vmap_method="sequential")


def conv3x3_input_grad(dy: jax.Array, kernel: jax.Array) -> jax.Array:
    """The input gradient [B, H, W, C] from the output cotangent dy [B, H, W, O]: the
    convolution of dy with the flipped kernel."""
    if kernel.shape[2] % LANES:
        return jax.linear_transpose(lambda x: _xla_conv3x3(x, kernel), jax.ShapeDtypeStruct(
            dy.shape[:-1] + kernel.shape[2:3], dy.dtype))(dy)[0]
    return conv3x3_forward(dy, _flip(kernel))


def conv3x3_weight_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
    """The (3, 3, C, O) kernel gradient from input x [B, H, W, C] and output cotangent
    dy [B, H, W, O]; O or C a multiple of 16 (else it is the flipped gradient of the
    convolution with the roles of x and dy swapped)."""
    if dy.shape[-1] % LANES:
        return _flip(conv3x3_weight_grad(dy, x))
    return _summed_weight_grad("fvae_conv3x3_weight_grad", x, dy)


def _summed_weight_grad(target: str, x: jax.Array, dy: jax.Array) -> jax.Array:
    """A weight-gradient kernel's (3, 3, C, O) result. The kernel returns one partial
    gradient per group of images and XLA sums them, so the result does not depend on
    the number of threads."""
    batch = x.shape[0]
    group = max(g for g in range(1, GROUP_IMAGES + 1) if batch % g == 0)
    x = x.reshape(batch // group, group, *x.shape[1:])
    dy = dy.reshape(batch // group, group, *dy.shape[1:])
    partials = _call(target, (batch // group, 3, 3, x.shape[-1], dy.shape[-1]), x, dy)
    # A dot with ones, not partials.sum(0): XLA:CPU's reduction over a leading axis
    # took 4 ms for the encoder's last conv (16 x 3 x 3 x 64 x 128 partials), the dot 0.1.
    return jnp.tensordot(jnp.ones(partials.shape[0], partials.dtype), partials, 1)


@jax.custom_vjp
def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A 3x3, stride-1, 'SAME' NHWC convolution and its gradients by fvae's kernels."""
    return conv3x3_forward(x, kernel)


def _conv3x3_fwd(x, kernel):
    return conv3x3_forward(x, kernel), (x, kernel)


def _conv3x3_bwd(residuals, dy):
    x, kernel = residuals
    return conv3x3_input_grad(dy, kernel), conv3x3_weight_grad(x, dy)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def covers(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
           dimension_numbers=None, feature_group_count=1, batch_group_count=1,
           precision=None, preferred_element_type=None) -> bool:
    """Whether conv_general_dilated's arguments describe a convolution fvae's kernels
    compute: 3x3, stride 1, 'SAME', float32 NHWC, in or out channels a multiple of 16."""
    ones = (None, (1, 1), [1, 1])
    return (lhs.ndim == 4 and rhs.shape[:2] == (3, 3) and tuple(window_strides) == (1, 1)
            and (padding == "SAME" or tuple(map(tuple, padding)) == ((1, 1), (1, 1)))
            and lhs_dilation in ones and rhs_dilation in ones and feature_group_count == 1
            and batch_group_count == 1 and precision is None
            and preferred_element_type is None and lhs.dtype == rhs.dtype == jnp.float32
            and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
            and (rhs.shape[2] % LANES == 0 or rhs.shape[3] % LANES == 0))


def conv_general_dilated(lhs, rhs, *args, **kwargs) -> jax.Array:
    """jax.lax.conv_general_dilated, by fvae's kernels for the convolutions they cover
    when running on the CPU (see the module doc)."""
    if covers(lhs, rhs, *args, **kwargs) and jax.default_backend() == "cpu" and load():
        return conv3x3(lhs, rhs)
    return jax.lax.conv_general_dilated(lhs, rhs, *args, **kwargs)


# The residual blocks' convolutions with their bias, residual and ReLU in one pass.

def _relu_conv3x3_grads(x, kernel, y, dy):
    """Gradients of y = relu(conv3x3(x, kernel) + bias [+ residual]) for x, kernel,
    bias and the residual."""
    dz = jnp.where(y > 0, dy, jnp.zeros_like(dy))
    return conv3x3_input_grad(dz, kernel), conv3x3_weight_grad(x, dz), dz.sum((0, 1, 2)), dz


@jax.custom_vjp
def conv3x3_bias_relu_fused(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """relu(conv3x3(x, kernel) + bias) by one kernel pass; out-channels a multiple of 16."""
    return _call("fvae_conv3x3_bias_relu", x.shape[:-1] + kernel.shape[3:], x, kernel, bias,
                 vmap_method="sequential")


def _bias_relu_fwd(x, kernel, bias):
    y = conv3x3_bias_relu_fused(x, kernel, bias)
    return y, (x, kernel, y)


def _bias_relu_bwd(residuals, dy):
    return _relu_conv3x3_grads(*residuals, dy)[:3]


conv3x3_bias_relu_fused.defvjp(_bias_relu_fwd, _bias_relu_bwd)


@jax.custom_vjp
def conv3x3_bias_add_relu_fused(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                                residual: jax.Array) -> jax.Array:
    """relu(residual + (conv3x3(x, kernel) + bias)) by one kernel pass."""
    return _call("fvae_conv3x3_bias_add_relu", x.shape[:-1] + kernel.shape[3:], x, kernel,
                 bias, residual, vmap_method="sequential")


def _bias_add_relu_fwd(x, kernel, bias, residual):
    y = conv3x3_bias_add_relu_fused(x, kernel, bias, residual)
    return y, (x, kernel, y)


def _bias_add_relu_bwd(residuals, dy):
    return _relu_conv3x3_grads(*residuals, dy)


conv3x3_bias_add_relu_fused.defvjp(_bias_add_relu_fwd, _bias_add_relu_bwd)


def conv3x3_bias_relu(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                      residual: jax.Array | None = None) -> jax.Array:
    """relu(residual + (conv3x3(x, kernel) + bias)) (no residual if None), as
    models.ResBlock computes its convolutions: one fused kernel pass on the CPU where
    fvae's kernels cover the convolution and its out-channels are a multiple of 16, else
    the same with `conv_general_dilated`."""
    if (kernel.shape[3] % LANES == 0 and bias.dtype == jnp.float32
            and (residual is None or residual.dtype == jnp.float32)
            and covers(x, kernel, (1, 1), "SAME", dimension_numbers=NHWC)
            and jax.default_backend() == "cpu" and load()):
        if residual is None:
            return conv3x3_bias_relu_fused(x, kernel, bias)
        return conv3x3_bias_add_relu_fused(x, kernel, bias, residual)
    y = conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=NHWC) + bias
    return jax.nn.relu(y if residual is None else residual + y)


# The stride-2 transposed convolution of the decoder's upsampling layers.

def conv_transpose_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [B, H, W, C], kernel (3, 3, C, O) -> [B, 2H, 2W, O]."""
    b, h, w, _ = x.shape
    return _call("fvae_conv_transpose3x3s2", (b, 2 * h, 2 * w, kernel.shape[3]), x, kernel,
                 vmap_method="sequential")


def conv_transpose_input_grad(dy: jax.Array, kernel: jax.Array) -> jax.Array:
    """The input gradient [B, H, W, C] from the output cotangent dy [B, 2H, 2W, O]."""
    b, h, w, _ = dy.shape
    return _call("fvae_conv_transpose3x3s2_input_grad", (b, h // 2, w // 2, kernel.shape[2]),
                 dy, kernel.transpose(0, 1, 3, 2), vmap_method="sequential")


@jax.custom_vjp
def conv_transpose3x3s2(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """nn.ConvTranspose(O, (3, 3), strides=(2, 2), padding='SAME')'s convolution (no
    bias) and its gradients by fvae's kernels; C and O multiples of 16."""
    return conv_transpose_forward(x, kernel)


def _conv_transpose_fwd(x, kernel):
    return conv_transpose_forward(x, kernel), (x, kernel)


def _conv_transpose_bwd(residuals, dy):
    x, kernel = residuals
    return (conv_transpose_input_grad(dy, kernel),
            _summed_weight_grad("fvae_conv_transpose3x3s2_weight_grad", x, dy))


conv_transpose3x3s2.defvjp(_conv_transpose_fwd, _conv_transpose_bwd)


@jax.custom_vjp
def conv_transpose3x3s2_bias_relu(x: jax.Array, kernel: jax.Array,
                                  bias: jax.Array) -> jax.Array:
    """relu(conv_transpose3x3s2(x, kernel) + bias) by one kernel pass."""
    b, h, w, _ = x.shape
    return _call("fvae_conv_transpose3x3s2_bias_relu", (b, 2 * h, 2 * w, kernel.shape[3]),
                 x, kernel, bias, vmap_method="sequential")


def _conv_transpose_bias_relu_fwd(x, kernel, bias):
    y = conv_transpose3x3s2_bias_relu(x, kernel, bias)
    return y, (x, kernel, y)


def _conv_transpose_bias_relu_bwd(residuals, dy):
    x, kernel, y = residuals
    dz = jnp.where(y > 0, dy, jnp.zeros_like(dy))
    return (*_conv_transpose_bwd((x, kernel), dz), dz.sum((0, 1, 2)))


conv_transpose3x3s2_bias_relu.defvjp(_conv_transpose_bias_relu_fwd,
                                     _conv_transpose_bias_relu_bwd)


def conv_transpose(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                   relu: bool = False) -> jax.Array:
    """A drop-in for models.subpixel_conv_transpose (a 3x3, stride-2, 'SAME' transposed
    convolution of NHWC images plus bias, then a ReLU if `relu`): by fvae's kernels on
    the CPU for float32 with in and out channels multiples of 16 (bias and ReLU in the
    same pass), else by models.subpixel_conv_transpose."""
    if (x.ndim == 4 and kernel.shape[:2] == (3, 3)
            and x.dtype == kernel.dtype == bias.dtype == jnp.float32
            and kernel.shape[2] % LANES == 0 and kernel.shape[3] % LANES == 0
            and jax.default_backend() == "cpu" and load()):
        if relu:
            return conv_transpose3x3s2_bias_relu(x, kernel, bias)
        return conv_transpose3x3s2(x, kernel) + bias
    y = models.subpixel_conv_transpose(x, kernel, bias)
    return jax.nn.relu(y) if relu else y
