"""The study's VAEs as Flax linen modules.

The study's high-capacity model (`model.name='conv'`):
  encoder: Conv32 stride 2, Conv64 stride 2, Conv128 stride 1, Dense256, then the mean
           and log-variance heads;
  decoder: Dense 7x7x128, two stride-2 transposed convs (64, 32), residual blocks, a 3x3
           conv to logits.
`KerasEncoder`/`KerasDecoder` are the classic small model of the Keras example
(`model.name='keras'`). Both decoders return logits (pre-sigmoid); what a logit means as
an image is the likelihood's business (`fvae.losses.pixel_mean`). Likelihoods with a
scale (model.decoder_scale) get a second channel holding its log: one learned scalar
shared by all pixels ('shared'), or a second output of the last layer ('per_pixel').
With 'none' the parameters are exactly those of a one-logit decoder.

Upsampling (model.upsample): 'subpixel' and 'conv_transpose' are the same layer,
nn.ConvTranspose(features, (3, 3), strides=(2, 2), padding='SAME') and a ReLU
(`ConvTransposeReLU`: the same parameters, initialisation and function), computed two
ways. XLA:CPU runs a transposed conv's weight gradient as a slow dilated convolution, so
'subpixel' computes it as one ordinary 2x2 conv plus depth-to-space
(`subpixel_conv_transpose`). 'pixel_shuffle' is a different function class: a free 2x2
conv to 4x the channels, then depth-to-space.

Every layer here is plain Flax. On a CPU, `fvae.cpu.accelerate(model, ...)` computes the
convolutions whose shapes fit with fvae's own kernels, from outside the model: the
parameters and the function are the same.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

IMAGE_SHAPE = (28, 28, 1)

Shard = tuple[int | jax.Array, int]  # (i, n): part i of n equal parts of a batch
NHWC = ("NHWC", "HWIO", "NHWC")


# Which 3x3 taps feed each output phase of a stride-2 'SAME' transposed conv: for an
# output row of parity r, window row dy of the 2x2 window uses kernel row PHASE_TAPS[r][dy].
PHASE_TAPS = ({0: 0, 1: 2}, {1: 1})


def phase_kernel(kernel: jax.Array) -> jax.Array:
    """A (3, 3, I, O) transposed-conv kernel as the (2, 2, I, 4*O) kernel of the ordinary
    2x2 conv that computes its four output phases (blocks ordered r0c0, r0c1, r1c0, r1c1).
    Unused taps are zeros, so the function (and the gradient w.r.t. `kernel`) is exactly
    that of the transposed conv."""
    zero = jnp.zeros_like(kernel[0, 0])
    blocks = []
    for rows in PHASE_TAPS:
        for cols in PHASE_TAPS:
            blocks.append(jnp.stack([
                jnp.stack([kernel[rows[dy], cols[dx]] if dy in rows and dx in cols else zero
                           for dx in (0, 1)]) for dy in (0, 1)]))
    return jnp.concatenate(blocks, axis=-1)


def depth_to_space(y: jax.Array, features: int) -> jax.Array:
    """[B, H, W, 4*C] with phase blocks (r, c) -> [B, 2H, 2W, C]."""
    b, h, w, _ = y.shape
    y = y.reshape(b, h, w, 2, 2, features).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(b, 2 * h, 2 * w, features)


def subpixel_conv_transpose(x: jax.Array, kernel: jax.Array,
                            bias: jax.Array | None = None) -> jax.Array:
    """nn.ConvTranspose(O, (3, 3), strides=(2, 2), padding='SAME') with `kernel` (3, 3, C, O)
    and `bias` (if any) applied to x [B, H, W, C], computed as one ordinary 2x2 conv plus
    depth-to-space."""
    y = jax.lax.conv_general_dilated(x, phase_kernel(kernel).astype(x.dtype), (1, 1),
                                     ((1, 0), (1, 0)), dimension_numbers=NHWC)
    y = depth_to_space(y, kernel.shape[-1])
    return y if bias is None else y + bias


class ConvTransposeReLU(nn.Module):
    """relu(nn.ConvTranspose(features, (3, 3), strides=(2, 2), padding='SAME')(x)): the
    decoder's upsampling layer, with that layer's parameters (kernel (3, 3, C, features),
    bias) and initialisation. `how` ('subpixel' or 'conv_transpose') chooses how it is
    computed, not what (see the module doc). One module with its ReLU, so that a kernel
    may compute the whole layer in one pass (fvae.cpu.accelerate)."""
    features: int
    how: str = "subpixel"

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        kernel, bias = kernel.astype(x.dtype), bias.astype(x.dtype)
        if self.how == "subpixel":
            return nn.relu(subpixel_conv_transpose(x, kernel, bias))
        return nn.relu(jax.lax.conv_transpose(x, kernel, (2, 2), "SAME",
                                              dimension_numbers=NHWC) + bias)


class PixelShuffleUpsample(nn.Module):
    """A free 2x2 conv to 4*features channels plus depth-to-space, then a ReLU: a
    slightly larger function class than the transposed conv (`pixel_shuffle`)."""
    features: int

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(4 * self.features, (2, 2), padding=((1, 0), (1, 0)))(x)
        return nn.relu(depth_to_space(y, self.features))


def upsample_relu(features: int, upsample: str, name: str) -> nn.Module:
    """The stride-2 upsampling layer model.upsample names, ReLU included."""
    if upsample == "pixel_shuffle":
        return PixelShuffleUpsample(features, name=name)
    return ConvTransposeReLU(features, upsample, name=name)


def output_channels(scale: str) -> int:
    """Channels of the decoder's last layer: a second one for a per-pixel log-scale."""
    return 2 if scale == "per_pixel" else 1


def with_shared_scale(module: nn.Module, out: jax.Array, scale: str) -> jax.Array:
    """Appends one learned log-scale (init 0), broadcast to every pixel, as a second
    channel when scale == 'shared'; call from a compact __call__."""
    if scale != "shared":
        return out
    log_scale = module.param("log_scale", nn.initializers.zeros_init(), ())
    return jnp.concatenate([out, jnp.broadcast_to(log_scale, out.shape).astype(out.dtype)],
                           axis=-1)


class ResBlock(nn.Module):
    """Two 3x3 convs with a skip connection: relu(x + Conv_1(relu(Conv_0(x)))).
    (fvae.cpu.accelerate computes exactly this from Conv_0's and Conv_1's parameters.)"""
    width: int

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(self.width, (3, 3), name="Conv_0")(x))
        return nn.relu(x + nn.Conv(self.width, (3, 3), name="Conv_1")(h))


class ConvEncoder(nn.Module):
    """Strided convs, a dense layer, then mean and log-variance heads."""
    latent_dim: int
    widths: Sequence[int] = (32, 64, 128)
    strides: Sequence[int] = (2, 2, 1)
    dense: int = 256

    @nn.compact
    def __call__(self, x):
        for width, stride in zip(self.widths, self.strides):
            x = nn.relu(nn.Conv(width, (3, 3), strides=(stride, stride))(x))
        x = nn.relu(nn.Dense(self.dense)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.latent_dim, name="mean")(x), \
            nn.Dense(self.latent_dim, name="logvar")(x)


class ConvDecoder(nn.Module):
    """Dense to 7x7, two stride-2 transposed convs, residual blocks, 1-channel logits
    (and a log-scale channel, see `scale`)."""
    widths: Sequence[int] = (128, 64, 32)
    num_res_blocks: int = 2
    upsample: str = "subpixel"
    scale: str = "none"  # one of configs.DECODER_SCALES

    @nn.compact
    def __call__(self, z):
        x = nn.relu(nn.Dense(7 * 7 * self.widths[0])(z))
        x = x.reshape(z.shape[0], 7, 7, self.widths[0])
        for i, width in enumerate(self.widths[1:]):
            x = upsample_relu(width, self.upsample, f"ConvTranspose_{i}")(x)
        for _ in range(self.num_res_blocks):
            x = ResBlock(self.widths[-1])(x)
        out = nn.Conv(output_channels(self.scale), (3, 3))(x)
        return with_shared_scale(self, out, self.scale)


class KerasEncoder(nn.Module):
    """The Keras example's encoder: two strided convs and Dense(16)."""
    latent_dim: int = 2

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))
        x = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2))(x))
        x = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.latent_dim, name="mean")(x), \
            nn.Dense(self.latent_dim, name="logvar")(x)


class KerasDecoder(nn.Module):
    """The Keras example's decoder: Dense(7*7*64) and three transposed convs."""
    upsample: str = "subpixel"
    scale: str = "none"  # one of configs.DECODER_SCALES

    @nn.compact
    def __call__(self, z):
        x = nn.relu(nn.Dense(7 * 7 * 64)(z)).reshape(z.shape[0], 7, 7, 64)
        x = upsample_relu(64, self.upsample, "ConvTranspose_0")(x)
        x = upsample_relu(32, self.upsample, "ConvTranspose_1")(x)
        out = nn.ConvTranspose(output_channels(self.scale), (3, 3), padding="SAME",
                               name="ConvTranspose_2")(x)
        return with_shared_scale(self, out, self.scale)


class VAE(nn.Module):
    """An encoder q(z|x) = N(mean, exp(logvar)) and a decoder p(x|z) given as logits."""
    encoder: nn.Module
    decoder: nn.Module

    def __call__(self, images, key, shard: Shard = (0, 1)):
        """Returns (logits, mean, logvar) for float images in [0, 1], [B, 28, 28, 1].

        `shard` = (i, n) says the images are part i of n equal parts of a batch: they get
        that part's rows of the whole batch's noise, so a batch split across devices
        draws exactly what it would in one piece."""
        mean, logvar = self.encode(images)
        z = reparameterize(key, mean, logvar, shard)
        return self.decode(z), mean, logvar

    def encode(self, images):
        return self.encoder(images)

    def decode(self, z):
        return self.decoder(z)


def reparameterize(key: jax.Array, mean: jax.Array, logvar: jax.Array,
                   shard: Shard = (0, 1)) -> jax.Array:
    """z = mean + sigma * eps with eps ~ N(0, I) drawn from `key`; for part i of n of a
    batch (`shard`, i may be traced), eps is that part's rows of the whole batch's draw."""
    eps = jax.random.normal(key, (shard[1] * mean.shape[0], *mean.shape[1:]), mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * take_shard(eps, shard)


def take_shard(x: jax.Array, shard: Shard) -> jax.Array:
    """Part i of n equal parts of x's leading axis, for `shard` = (i, n); i may be traced."""
    index, parts = shard
    if parts == 1:
        return x
    rows = x.shape[0] // parts
    return jax.lax.dynamic_slice_in_dim(x, index * rows, rows)


def build_model(model_config: ml_collections.ConfigDict) -> VAE:
    """The VAE the config's `model` block names."""
    if model_config.name == "keras":
        return VAE(KerasEncoder(model_config.latent_dim),
                   KerasDecoder(model_config.upsample, model_config.decoder_scale))
    return VAE(
        ConvEncoder(model_config.latent_dim, tuple(model_config.encoder_widths),
                    tuple(model_config.encoder_strides), model_config.encoder_dense),
        ConvDecoder(tuple(model_config.decoder_widths), model_config.num_res_blocks,
                    model_config.upsample, model_config.decoder_scale))


def _init_params(model: VAE, key: jax.Array):
    init_key, sample_key = jax.random.split(key)
    return model.init(init_key, jnp.zeros((1, *IMAGE_SHAPE)), sample_key)["params"]


# One compiled program (op by op, initialisation compiled ~120 small ones). On a CPU,
# LLVM's default optimisation level spends ~10 s on the random draws of a program that
# runs once; level 1 compiles it in a third of the time and draws the same bits
# (tests/test_models.py checks).
_init_on_cpu = jax.jit(_init_params, static_argnames="model",
                       compiler_options={"xla_backend_optimization_level": 1})
_init_elsewhere = jax.jit(_init_params, static_argnames="model")


def init_params(model: VAE, key: jax.Array):
    """Initial parameters for a batch of one 28x28 image (`model` may be a VAE or
    anything with its `init`, such as fvae.cpu.accelerate's)."""
    if isinstance(key, jax.core.Tracer):  # inside another trace (jax.eval_shape, jit)
        return _init_params(model, key)
    init = _init_on_cpu if jax.default_backend() == "cpu" else _init_elsewhere
    return init(model, key)


def to_float(images: jax.Array) -> jax.Array:
    """uint8 [B, 28, 28] (or already-float [B, 28, 28, 1]) -> float32 in [0, 1], NHWC."""
    if images.dtype == jnp.uint8:
        images = images.astype(jnp.float32) / 255.0
    return images.reshape(images.shape[0], *IMAGE_SHAPE)


def encode(model: VAE, params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Posterior mean and log-variance for a batch of images."""
    return model.apply({"params": params}, to_float(images), method=VAE.encode)


def decode(model: VAE, params, z: jax.Array) -> jax.Array:
    """Decoder outputs (logits, and a log-scale channel if any) [B, 28, 28, C] for z."""
    return model.apply({"params": params}, z, method=VAE.decode)


def sample(model: VAE, params, key: jax.Array, num: int, latent_dim: int,
           mean_fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Pixel means of images decoded from `num` draws of the prior N(0, I).

    `mean_fn` turns decoder outputs into images: the likelihood's mean, e.g.
    functools.partial(fvae.losses.pixel_mean, loss_config=config.loss)."""
    z = jax.random.normal(key, (num, latent_dim))
    return mean_fn(decode(model, params, z))


def reconstruct(model: VAE, params, images: jax.Array, key: jax.Array | None = None, *,
                mean_fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Pixel means of reconstructions: through a posterior draw, or its mean if no key.

    `mean_fn` as for `sample`: the likelihood's mean, which is not always a sigmoid."""
    mean, logvar = encode(model, params, images)
    z = mean if key is None else reparameterize(key, mean, logvar)
    return mean_fn(decode(model, params, z))
