"""The study's VAE written the obvious way in Keras 3 on TensorFlow, for comparison.

    python -m fvae.bench --reference keras     (needs tensorflow; pip install -e ".[tfds]")
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402
from keras import layers  # noqa: E402

from fvae.bench.common import report, spec_from_argv, time_steps  # noqa: E402


def build(model: str, latent: int):
    relu = "relu"
    if model == "keras":
        enc = [layers.Conv2D(32, 3, 2, "same", activation=relu),
               layers.Conv2D(64, 3, 2, "same", activation=relu), layers.Flatten(),
               layers.Dense(16, activation=relu)]
        dec = [layers.Dense(7 * 7 * 64, activation=relu), layers.Reshape((7, 7, 64)),
               layers.Conv2DTranspose(64, 3, 2, "same", activation=relu),
               layers.Conv2DTranspose(32, 3, 2, "same", activation=relu),
               layers.Conv2DTranspose(1, 3, 1, "same")]
        return keras.Sequential(enc), keras.Sequential(dec), latent
    enc = [layers.Conv2D(32, 3, 2, "same", activation=relu),
           layers.Conv2D(64, 3, 2, "same", activation=relu),
           layers.Conv2D(128, 3, 1, "same", activation=relu), layers.Flatten(),
           layers.Dense(256, activation=relu)]
    inp = keras.Input((latent,))
    x = layers.Dense(7 * 7 * 128, activation=relu)(inp)
    x = layers.Reshape((7, 7, 128))(x)
    x = layers.Conv2DTranspose(64, 3, 2, "same", activation=relu)(x)
    x = layers.Conv2DTranspose(32, 3, 2, "same", activation=relu)(x)
    for _ in range(2):
        h = layers.Conv2D(32, 3, padding="same", activation=relu)(x)
        h = layers.Conv2D(32, 3, padding="same")(h)
        x = layers.ReLU()(layers.Add()([x, h]))
    out = layers.Conv2D(1, 3, padding="same")(x)
    return keras.Sequential(enc), keras.Model(inp, out), latent


def main():
    spec = spec_from_argv()
    encoder, decoder, latent = build(spec["model"], spec["latent_dim"])
    heads = layers.Dense(2 * latent)
    optimizer = keras.optimizers.Adam(1e-3)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            h = heads(encoder(x))
            mean, logvar = h[:, :latent], h[:, latent:]
            z = mean + tf.exp(0.5 * logvar) * tf.random.normal(tf.shape(mean))
            logits = decoder(z)
            recon = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(x, logits), [1, 2, 3])
            kl = 0.5 * tf.reduce_sum(tf.exp(logvar) + mean ** 2 - 1 - logvar, 1)
            loss = tf.reduce_mean(recon + kl)
        variables = encoder.trainable_variables + heads.trainable_variables + \
            decoder.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    rng = np.random.default_rng(0)
    batches = [tf.constant(rng.integers(0, 256, (spec["batch_size"], 28, 28, 1))
                           .astype(np.float32) / 255) for _ in range(4)]
    first, per_step = time_steps(lambda b: step(b).numpy(), batches, spec["steps"])
    report(spec, "keras", first, per_step, "cpu")


if __name__ == "__main__":
    main()
