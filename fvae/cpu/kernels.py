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
where the kernels cannot be compiled gets XLA's own (the last with a warning).

Which implementation computes each layer is measured, not assumed: the source is
compiled once per candidate register-tile set for the host's instruction set
(CANDIDATES), and the first time a layer shape is traced, fvae/cpu/dispatch.py times
every compiled tile set and XLA on it and keeps the fastest (a kernel, unless XLA is
faster by dispatch.XLA_MARGIN). Vmapped seeds are measured one seed's layer at a time,
although XLA runs its vmapped convolution less well (docs/parallelism.md): a bias
towards XLA that costs speed only. Each library is compiled on first use with the
host's compiler (CXX, else c++), in parallel, and cached under $FVAE_CACHE_DIR (default
~/.cache/fvae) by a hash of the source, the flags, jaxlib and the CPU; the choices are
cached beside them, and a resumed run computes with the choices its provenance records.
"""

from __future__ import annotations

import concurrent.futures
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
from fvae.cpu import dispatch

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
XLA = dispatch.XLA

# The candidate register tiles, "lanes,vectors,pixels,inputs" (FVAE_TILES in
# conv3x3.cc), per instruction set. Each fits the registers: vectors x pixels (and
# vectors x inputs) accumulators, `vectors` operands and a broadcast in the 32 vector
# registers of AVX-512 and NEON, the 16 of AVX2 and SSE. AVX-512 machines also try
# 256-bit vectors, which some Intel CPUs run at a higher clock. The first of each was
# the hand-picked one, measured best on AMD.
CANDIDATES = {"avx512": ("16,2,14,8", "16,4,6,6", "8,4,6,6"),
              "avx2": ("8,4,3,3", "8,2,6,6", "8,3,4,4"),
              "neon": ("4,4,6,6", "4,2,12,8"),
              "sse": ("4,2,6,6", "4,3,4,4")}
# Tile sets to use instead of the host's candidates, ';'-separated: one set is used for
# every layer unmeasured (the tests force each instruction set's tiles this way).
TILES_VARIABLE = "FVAE_KERNEL_TILES"
TILE_SET = re.compile(r"(4|8|16)(,[1-9][0-9]?){3}")
# A layer with a larger batch is timed on this many images: the kernels' and XLA's cost
# per image does not depend on the batch, and evaluation's batches of 1000 took 8x as
# long to time.
TIMED_BATCH = 128
BATCHED_ARGUMENTS = {"conv3x3_weight_grad": (0, 1), "conv_transpose_weight_grad": (0, 1),
                     "conv3x3_bias_add_relu": (0, 3)}  # the others': the first only


def cache_dir() -> pathlib.Path:
    default = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
    return pathlib.Path(os.environ.get("FVAE_CACHE_DIR", default / "fvae"))


def instruction_set() -> str:
    """The host's widest vector extension among CANDIDATES' keys."""
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "neon"
    flags = {flag for line in cpu_fingerprint().splitlines() if line.startswith("flags")
             for flag in line.split(":", 1)[1].split()}
    return "avx512" if "avx512f" in flags else "avx2" if "avx" in flags else "sse"


def candidates() -> tuple[str, ...]:
    """The tile sets to compile and measure: FVAE_KERNEL_TILES's, else the host's."""
    value = os.environ.get(TILES_VARIABLE)
    if value is None:
        return CANDIDATES[instruction_set()]
    sets = tuple(t.strip() for t in value.split(";") if t.strip())
    if not sets or not all(TILE_SET.fullmatch(t) for t in sets):
        raise ValueError(f"{TILES_VARIABLE}={value!r}: expected tile sets of lanes (4, 8 or "
                         f"16) and three tile sizes, ';'-separated, as in '8,4,3,3;8,2,6,6'; "
                         f"unset it to measure the host's candidates")
    return sets


def forced() -> bool:
    """Whether FVAE_KERNEL_TILES names one tile set, used for every layer unmeasured."""
    return os.environ.get(TILES_VARIABLE) is not None and len(candidates()) == 1


def compile_command(source: pathlib.Path, output: pathlib.Path, tiles: str) -> list[str]:
    arch = "-mcpu=native" if platform.machine().lower() in ("arm64", "aarch64") else \
        "-march=native"
    if not TILE_SET.fullmatch(tiles):
        raise ValueError(f"tile set {tiles!r}: expected 'lanes,vectors,pixels,inputs'")
    return [os.environ.get("CXX", "c++"), "-O3", arch, "-std=c++17", "-shared", "-fPIC",
            f"-DFVAE_TILES={tiles}", f"-I{jax.ffi.include_dir()}", str(source), "-o",
            str(output)]


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


def _build_key(*parts: bytes) -> str:
    return hashlib.sha256(b"\0".join([
        _source(), jaxlib.version.__version__.encode(), cpu_fingerprint().encode(),
        *parts])).hexdigest()[:16]


@functools.cache
def _source() -> bytes:
    return SOURCE.read_bytes()


def library_path(tiles: str) -> pathlib.Path:
    """The kernels compiled with `tiles`, compiling them first if this machine has no
    cached copy."""
    command = " ".join(compile_command(SOURCE, pathlib.Path("out"), tiles)).encode()
    path = cache_dir() / "kernels" / f"conv3x3-{_build_key(command)}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = pathlib.Path(tmp) / path.name
        logging.info("compiling %s with tiles %s", SOURCE.name, tiles)
        subprocess.run(compile_command(SOURCE, built, tiles), check=True,
                       capture_output=True, text=True)
        os.replace(built, path)  # atomic: processes compiling at once both end well
    return path


def table_path() -> pathlib.Path:
    """The file of this machine's measured choices: keyed by the kernels' source and the
    Python that calls and times them, jaxlib, the CPU, the candidates, XLA_FLAGS (they
    choose XLA's convolutions), the device count and the cores this process may use (a
    cache shared by machines or containers of other sizes)."""
    context = [";".join(candidates()), os.environ.get("XLA_FLAGS", ""),
               str(jax.device_count()), str(_usable_cores())]
    key = _build_key(*_python_code(), *map(str.encode, context))
    return cache_dir() / "kernels" / f"dispatch-{key}.json"


@functools.cache
def _python_code() -> tuple[bytes, ...]:
    """The Python that calls and times the kernels, read once (table_path runs for
    every layer traced)."""
    return tuple(pathlib.Path(m.__file__).read_bytes() for m in (dispatch, models)) + \
        (pathlib.Path(__file__).read_bytes(),)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # (no sched_getaffinity: macOS, Windows)
        return os.cpu_count() or 1


def _tag(tiles: str) -> str:
    return tiles.replace(",", "_")


def load() -> tuple[str, ...]:
    """Compiles (once per machine, the candidates in parallel) and registers each
    candidate tile set's kernels with XLA; the tile sets that could be. () after a
    warning where none could be (no C++ compiler, an unsupported one, ...): XLA's
    convolutions are then used."""
    return _load(candidates())


@functools.cache
def _load(wanted: tuple[str, ...]) -> tuple[str, ...]:
    new = [t for t in wanted if t not in _registered]  # (XLA takes a target name once)
    with concurrent.futures.ThreadPoolExecutor(max(1, len(new))) as pool:
        built = dict(zip(new, pool.map(_try_build, new)))
    failures = {t: e for t, e in built.items() if isinstance(e, Exception)}
    for tiles, e in failures.items():
        detail = getattr(e, "stderr", "") or e
        logging.warning("fvae's CPU kernels with tiles %s could not be compiled, so %s (set "
                        "runtime.cpu_conv3x3='xla' to skip them): %s", tiles,
                        "XLA's convolutions are used" if len(failures) == len(wanted)
                        else "the other tile sets are measured", str(detail)[-2000:])
    for tiles, library in built.items():
        if isinstance(library, Exception):
            continue
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(f"{target}_{_tag(tiles)}",
                                        jax.ffi.pycapsule(getattr(library, symbol)),
                                        platform="cpu")
        _registered[tiles] = library
    return tuple(t for t in wanted if t in _registered)


_registered: dict[str, ctypes.CDLL] = {}  # tile sets registered with XLA in this process


def _try_build(tiles: str) -> ctypes.CDLL | Exception:
    try:
        return ctypes.cdll.LoadLibrary(str(library_path(tiles)))
    except (OSError, AttributeError, subprocess.CalledProcessError) as e:
        return e


def _choose(op: str, arrays, kernel_fn, xla_fn) -> str:
    """The tile set that computes `op` on these arrays' shapes fastest here, or 'xla'."""
    tile_sets = load()
    if not tile_sets:
        return XLA
    if forced() and not dispatch.afresh():  # (fvae.bench.kernels measures it all the same)
        dispatch.record_forced(op, [a.shape for a in arrays], tile_sets[0])
        return tile_sets[0]
    options = {t: functools.partial(kernel_fn, t) for t in tile_sets} | {XLA: xla_fn}
    batched = BATCHED_ARGUMENTS.get(op, (0,))
    timed = [(min(a.shape[0], TIMED_BATCH), *a.shape[1:]) if i in batched else a.shape
             for i, a in enumerate(arrays)]
    return dispatch.choose(op, [a.shape for a in arrays], options, table_path(), timed)


def _dispatched(op: str, kernel_fn, xla_fn, *arrays: jax.Array) -> jax.Array:
    """`op` on `arrays` by the implementation measured fastest for their shapes:
    kernel_fn(tiles, *arrays) or xla_fn(*arrays)."""
    tiles = _choose(op, arrays, kernel_fn, xla_fn)
    return xla_fn(*arrays) if tiles == XLA else kernel_fn(tiles, *arrays)


def _call(target: str, tiles: str, shape: tuple[int, ...], *args: jax.Array,
          vmap_method: str = "broadcast_all") -> jax.Array:
    return jax.ffi.ffi_call(f"{target}_{_tag(tiles)}", jax.ShapeDtypeStruct(shape, jnp.float32),
                            vmap_method=vmap_method)(*args)


def _pullback(fn, primal_shape, dtype=jnp.float32):
    """The cotangent map of a function linear in its one argument (XLA's gradient)."""
    return lambda cotangent: jax.vjp(fn, jnp.zeros(primal_shape, dtype))[1](cotangent)[0]


def _flip(kernel: jax.Array) -> jax.Array:
    """A 3x3 kernel flipped in space, its in and out channels swapped."""
    return kernel[::-1, ::-1].transpose(0, 1, 3, 2)


# ---------------------------------------------------------------- 3x3, stride-1 convs
def _xla_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=NHWC)


def _kernel_conv3x3(tiles: str, x: jax.Array, kernel: jax.Array) -> jax.Array:
    # vmapped (seeds): one call per kernel, each on every thread
    return _call("fvae_conv3x3", tiles, x.shape[:-1] + kernel.shape[3:], x, kernel,
                 vmap_method="sequential")


def _xla_conv3x3_weight_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
    return _pullback(lambda k: _xla_conv3x3(x, k), (3, 3, x.shape[-1], dy.shape[-1]))(dy)


def _kernel_conv3x3_weight_grad(tiles: str, x: jax.Array, dy: jax.Array) -> jax.Array:
    return _summed_weight_grad("fvae_conv3x3_weight_grad", tiles, x, dy)


def conv3x3_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A 3x3, stride-1, 'SAME' NHWC convolution: x [B, H, W, C], kernel (3, 3, C, O);
    by the measured choice when O is a multiple of 16, else XLA's."""
    if kernel.shape[3] % LANES:
        return _xla_conv3x3(x, kernel)
    return _dispatched("conv3x3", _kernel_conv3x3, _xla_conv3x3, x, kernel)


def conv3x3_input_grad(dy: jax.Array, kernel: jax.Array) -> jax.Array:
    """The input gradient [B, H, W, C] from the output cotangent dy [B, H, W, O]: the
    convolution of dy with the flipped kernel."""
    if kernel.shape[2] % LANES:
        return _pullback(lambda x: _xla_conv3x3(x, kernel), dy.shape[:-1] + kernel.shape[2:3])(dy)
    return conv3x3_forward(dy, _flip(kernel))


def conv3x3_weight_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
    """The (3, 3, C, O) kernel gradient from input x [B, H, W, C] and output cotangent
    dy [B, H, W, O]; O or C a multiple of 16 (else it is the flipped gradient of the
    convolution with the roles of x and dy swapped)."""
    if dy.shape[-1] % LANES:
        return _flip(conv3x3_weight_grad(dy, x))
    return _dispatched("conv3x3_weight_grad", _kernel_conv3x3_weight_grad,
                       _xla_conv3x3_weight_grad, x, dy)


def _summed_weight_grad(target: str, tiles: str, x: jax.Array, dy: jax.Array) -> jax.Array:
    """A weight-gradient kernel's (3, 3, C, O) result. The kernel returns one partial
    gradient per group of images and XLA sums them, so the result does not depend on
    the number of threads."""
    batch = x.shape[0]
    group = max(g for g in range(1, GROUP_IMAGES + 1) if batch % g == 0)
    x = x.reshape(batch // group, group, *x.shape[1:])
    dy = dy.reshape(batch // group, group, *dy.shape[1:])
    partials = _call(target, tiles, (batch // group, 3, 3, x.shape[-1], dy.shape[-1]), x, dy)
    # A dot with ones, not partials.sum(0): XLA:CPU's reduction over a leading axis
    # took 4 ms for the encoder's last conv (16 x 3 x 3 x 64 x 128 partials), the dot 0.1.
    return jnp.tensordot(jnp.ones(partials.shape[0], partials.dtype), partials, 1)


def _measured_gradients(forward, backward):
    """forward(x, kernel), differentiated by backward((x, kernel), dy): a linear layer
    whose gradients are each dispatched by measurement, whatever computes its forward."""
    layer = jax.custom_vjp(forward)
    layer.defvjp(lambda x, kernel: (forward(x, kernel), (x, kernel)), backward)
    return layer


def _conv3x3_bwd(residuals, dy):
    x, kernel = residuals
    return conv3x3_input_grad(dy, kernel), conv3x3_weight_grad(x, dy)


# A 3x3, stride-1, 'SAME' NHWC convolution and its gradients, each by the implementation
# measured fastest for its shapes; and the same with XLA's forward pass (which XLA may
# fuse with what follows it), for where XLA was measured faster at the whole layer.
conv3x3 = _measured_gradients(conv3x3_forward, _conv3x3_bwd)
_conv3x3_xla_forward = _measured_gradients(_xla_conv3x3, _conv3x3_bwd)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def conv3x3_bias_relu_fused(tiles: str, x: jax.Array, kernel: jax.Array,
                            bias: jax.Array) -> jax.Array:
    """relu(conv3x3(x, kernel) + bias) by one pass of the kernel with `tiles`;
    out-channels a multiple of 16."""
    return _call("fvae_conv3x3_bias_relu", tiles, x.shape[:-1] + kernel.shape[3:], x, kernel,
                 bias, vmap_method="sequential")


def _bias_relu_fwd(tiles, x, kernel, bias):
    y = conv3x3_bias_relu_fused(tiles, x, kernel, bias)
    return y, (x, kernel, y)


def _bias_relu_bwd(tiles, residuals, dy):
    return _relu_conv3x3_grads(*residuals, dy)[:3]


conv3x3_bias_relu_fused.defvjp(_bias_relu_fwd, _bias_relu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def conv3x3_bias_add_relu_fused(tiles: str, x: jax.Array, kernel: jax.Array, bias: jax.Array,
                                residual: jax.Array) -> jax.Array:
    """relu(residual + (conv3x3(x, kernel) + bias)) by one kernel pass."""
    return _call("fvae_conv3x3_bias_add_relu", tiles, x.shape[:-1] + kernel.shape[3:], x,
                 kernel, bias, residual, vmap_method="sequential")


def _bias_add_relu_fwd(tiles, x, kernel, bias, residual):
    y = conv3x3_bias_add_relu_fused(tiles, x, kernel, bias, residual)
    return y, (x, kernel, y)


def _bias_add_relu_bwd(tiles, residuals, dy):
    return _relu_conv3x3_grads(*residuals, dy)


conv3x3_bias_add_relu_fused.defvjp(_bias_add_relu_fwd, _bias_add_relu_bwd)


def _xla_conv3x3_bias_relu(x, kernel, bias, residual=None):
    y = _xla_conv3x3(x, kernel) + bias
    return jax.nn.relu(y if residual is None else residual + y)


def conv3x3_bias_relu(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                      residual: jax.Array | None = None) -> jax.Array:
    """relu(residual + (conv3x3(x, kernel) + bias)) (no residual if None), as
    models.ResBlock computes its convolutions. On the CPU, where fvae's kernels cover
    the convolution and its out-channels are a multiple of 16, the whole layer is
    measured: one fused kernel pass against XLA's convolution with its bias, residual
    and ReLU fused as XLA fuses them; the gradients are measured each on its own."""
    if (kernel.shape[3] % LANES == 0 and bias.dtype == jnp.float32
            and (residual is None or residual.dtype == jnp.float32)
            and covers(x, kernel, (1, 1), "SAME", dimension_numbers=NHWC)
            and jax.default_backend() == "cpu" and load()):
        if residual is None:
            tiles = _choose("conv3x3_bias_relu", (x, kernel, bias), conv3x3_bias_relu_fused,
                            _xla_conv3x3_bias_relu)
            if tiles != XLA:
                return conv3x3_bias_relu_fused(tiles, x, kernel, bias)
        else:
            tiles = _choose("conv3x3_bias_add_relu", (x, kernel, bias, residual),
                            conv3x3_bias_add_relu_fused, _xla_conv3x3_bias_relu)
            if tiles != XLA:
                return conv3x3_bias_add_relu_fused(tiles, x, kernel, bias, residual)
        y = _conv3x3_xla_forward(x, kernel) + bias
    else:
        y = conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=NHWC) + bias
    return jax.nn.relu(y if residual is None else residual + y)


# ---------------------------------------------------------------- the decoder's upsampling
# The stride-2 transposed convolution (3x3, 'SAME') of the upsampling layers.

def _xla_conv_transpose(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return models.subpixel_conv_transpose(x, kernel)


def _kernel_conv_transpose(tiles: str, x: jax.Array, kernel: jax.Array) -> jax.Array:
    b, h, w, _ = x.shape
    return _call("fvae_conv_transpose3x3s2", tiles, (b, 2 * h, 2 * w, kernel.shape[3]), x,
                 kernel, vmap_method="sequential")


def _xla_conv_transpose_input_grad(dy: jax.Array, kernel: jax.Array) -> jax.Array:
    b, h, w, _ = dy.shape
    return _pullback(lambda x: _xla_conv_transpose(x, kernel),
                     (b, h // 2, w // 2, kernel.shape[2]))(dy)


def _kernel_conv_transpose_input_grad(tiles: str, dy: jax.Array,
                                      kernel: jax.Array) -> jax.Array:
    b, h, w, _ = dy.shape
    return _call("fvae_conv_transpose3x3s2_input_grad", tiles,
                 (b, h // 2, w // 2, kernel.shape[2]), dy, kernel.transpose(0, 1, 3, 2),
                 vmap_method="sequential")


def _xla_conv_transpose_weight_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
    return _pullback(lambda k: _xla_conv_transpose(x, k),
                     (3, 3, x.shape[-1], dy.shape[-1]))(dy)


def _kernel_conv_transpose_weight_grad(tiles: str, x: jax.Array, dy: jax.Array) -> jax.Array:
    return _summed_weight_grad("fvae_conv_transpose3x3s2_weight_grad", tiles, x, dy)


def conv_transpose_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [B, H, W, C], kernel (3, 3, C, O) -> [B, 2H, 2W, O]."""
    return _dispatched("conv_transpose", _kernel_conv_transpose, _xla_conv_transpose,
                       x, kernel)


def conv_transpose_input_grad(dy: jax.Array, kernel: jax.Array) -> jax.Array:
    """The input gradient [B, H, W, C] from the output cotangent dy [B, 2H, 2W, O]."""
    return _dispatched("conv_transpose_input_grad", _kernel_conv_transpose_input_grad,
                       _xla_conv_transpose_input_grad, dy, kernel)


def conv_transpose_weight_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
    """The (3, 3, C, O) kernel gradient from x [B, H, W, C] and dy [B, 2H, 2W, O]."""
    return _dispatched("conv_transpose_weight_grad", _kernel_conv_transpose_weight_grad,
                       _xla_conv_transpose_weight_grad, x, dy)


def _conv_transpose_bwd(residuals, dy):
    x, kernel = residuals
    return conv_transpose_input_grad(dy, kernel), conv_transpose_weight_grad(x, dy)


# nn.ConvTranspose(O, (3, 3), strides=(2, 2), padding='SAME')'s convolution (no bias) and
# its gradients, each by the implementation measured fastest (C and O multiples of 16);
# and the same with XLA's forward pass.
conv_transpose3x3s2 = _measured_gradients(conv_transpose_forward, _conv_transpose_bwd)
_conv_transpose_xla_forward = _measured_gradients(_xla_conv_transpose, _conv_transpose_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def conv_transpose3x3s2_bias_relu(tiles: str, x: jax.Array, kernel: jax.Array,
                                  bias: jax.Array) -> jax.Array:
    """relu(conv_transpose3x3s2(x, kernel) + bias) by one pass of the kernel with `tiles`."""
    b, h, w, _ = x.shape
    return _call("fvae_conv_transpose3x3s2_bias_relu", tiles,
                 (b, 2 * h, 2 * w, kernel.shape[3]), x, kernel, bias, vmap_method="sequential")


def _conv_transpose_bias_relu_fwd(tiles, x, kernel, bias):
    y = conv_transpose3x3s2_bias_relu(tiles, x, kernel, bias)
    return y, (x, kernel, y)


def _conv_transpose_bias_relu_bwd(tiles, residuals, dy):
    x, kernel, y = residuals
    dz = jnp.where(y > 0, dy, jnp.zeros_like(dy))
    return (*_conv_transpose_bwd((x, kernel), dz), dz.sum((0, 1, 2)))


conv_transpose3x3s2_bias_relu.defvjp(_conv_transpose_bias_relu_fwd,
                                     _conv_transpose_bias_relu_bwd)


def _xla_conv_transpose_bias_relu(x, kernel, bias):
    return jax.nn.relu(models.subpixel_conv_transpose(x, kernel, bias))


def conv_transpose(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                   relu: bool = False) -> jax.Array:
    """A drop-in for models.subpixel_conv_transpose (a 3x3, stride-2, 'SAME' transposed
    convolution of NHWC images plus bias, then a ReLU if `relu`): on the CPU for float32
    with in and out channels multiples of 16, by the implementations measured fastest
    (with `relu`, the whole layer is measured: one kernel pass that adds the bias and
    applies the ReLU as it stores, against XLA's fused layer), else by
    models.subpixel_conv_transpose."""
    if not (x.ndim == 4 and kernel.shape[:2] == (3, 3)
            and x.dtype == kernel.dtype == bias.dtype == jnp.float32
            and kernel.shape[2] % LANES == 0 and kernel.shape[3] % LANES == 0
            and jax.default_backend() == "cpu" and load()):
        y = models.subpixel_conv_transpose(x, kernel, bias)
    elif not relu:
        y = conv_transpose3x3s2(x, kernel) + bias
    else:
        tiles = _choose("conv_transpose_bias_relu", (x, kernel, bias),
                        conv_transpose3x3s2_bias_relu, _xla_conv_transpose_bias_relu)
        if tiles != XLA:
            return conv_transpose3x3s2_bias_relu(tiles, x, kernel, bias)
        y = _conv_transpose_xla_forward(x, kernel) + bias
    return jax.nn.relu(y) if relu else y
