"""A small Fashion-MNIST CNN whose penultimate layer is fvae's feature space for
Fréchet distances (fvae.evaluate).

It is trained once per dataset on the training split (from fvae.data, no network)
and cached as a msgpack file (flax.serialization, no pickle) next to a .sha256 file;
the checksum is verified on every load and a missing or corrupt file is retrained.
The cache file name holds a fingerprint of the data and the training settings, so a
classifier trained on other data (e.g. a test fixture) is never reused by mistake.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from fvae.batching import map_batches

VERSION = 1  # bump when the architecture or the training recipe changes
FEATURE_DIM = 128
NUM_CLASSES = 10
BATCH_SIZE = 128
LEARNING_RATE = 1e-3
SEED = 0


class ClassifierError(RuntimeError):
    """The cached classifier cannot be written; the message says what to do."""


class CNN(nn.Module):
    """Two conv + average-pool stages, Dense(FEATURE_DIM) features, Dense(10) logits."""

    @nn.compact
    def __call__(self, x):
        for width in (32, 64):
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = nn.avg_pool(x, (2, 2), (2, 2))
        features = nn.relu(nn.Dense(FEATURE_DIM)(x.reshape(x.shape[0], -1)))
        return nn.Dense(NUM_CLASSES)(features), features


@dataclasses.dataclass(frozen=True)
class Classifier:
    """Trained parameters and the test accuracy measured when it was trained."""
    params: dict
    test_accuracy: float


def _as_input(images: jax.Array) -> jax.Array:
    """uint8 [B, 28, 28] or float [B, 28, 28(, 1)] in [0, 1] -> float [B, 28, 28, 1]."""
    if images.dtype == jnp.uint8:
        images = images.astype(jnp.float32) / 255.0
    return images.reshape(images.shape[0], 28, 28, 1)


@jax.jit
def _apply(params, images):
    return CNN().apply({"params": params}, _as_input(images))


def _outputs(classifier: Classifier, images: np.ndarray, batch_size: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """(logits, features) for all images, in batches padded to one compiled shape."""
    if not len(images):
        return np.zeros((0, NUM_CLASSES), np.float32), np.zeros((0, FEATURE_DIM), np.float32)
    return map_batches(_apply, classifier.params, images, batch_size)


def features(classifier: Classifier, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Penultimate-layer features [N, FEATURE_DIM] of images (uint8, or floats in [0, 1])."""
    return _outputs(classifier, images, batch_size)[1]


def accuracy(classifier: Classifier, images: np.ndarray, labels: np.ndarray,
             batch_size: int = 1000) -> float:
    """Fraction of images whose most likely class is their label."""
    logits = _outputs(classifier, images, batch_size)[0]
    return float(np.mean(logits.argmax(-1) == labels))


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _train_step(params, opt_state, images, labels, idx):
    """One Adam step on images[idx]; the training set is an argument, gathered on device."""
    def loss_fn(p):
        logits, _ = CNN().apply({"params": p}, _as_input(images[idx]))
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels[idx]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = _optimizer().update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _optimizer() -> optax.GradientTransformation:
    return optax.adam(LEARNING_RATE)


def train(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
          test_labels: np.ndarray, epochs: int, progress: bool = True) -> Classifier:
    """Trains the CNN with Adam on shuffled minibatches; deterministic given the data."""
    from tqdm.auto import tqdm

    init_key, data_key = jax.random.split(jax.random.key(SEED))
    params = CNN().init(init_key, jnp.zeros((1, 28, 28, 1)))["params"]
    opt_state = _optimizer().init(params)
    batch = min(BATCH_SIZE, len(train_images))
    steps = len(train_images) // batch
    images, labels = jax.device_put(train_images), jax.device_put(train_labels.astype(np.int32))
    with tqdm(total=epochs * steps, desc="classifier", unit="step", disable=not progress,
              leave=False) as bar:
        for epoch in range(epochs):
            perm = jax.random.permutation(jax.random.fold_in(data_key, epoch), len(images))
            for step in range(steps):
                idx = perm[step * batch:(step + 1) * batch]
                params, opt_state, loss = _train_step(params, opt_state, images, labels, idx)
                bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.3f}")
    classifier = Classifier(params, 0.0)
    return Classifier(params, accuracy(classifier, test_images, test_labels))


def fingerprint(*arrays: np.ndarray, epochs: int) -> str:
    """sha256 over the data and the training recipe: the cache key of a classifier."""
    digest = hashlib.sha256(f"v{VERSION}-e{epochs}-lr{LEARNING_RATE}-b{BATCH_SIZE}".encode())
    for array in arrays:
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def default_cache_dir() -> pathlib.Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return pathlib.Path(cache).expanduser() / "fvae" / "classifier"


def _sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _read(path: pathlib.Path) -> Classifier | None:
    """The cached classifier, or None (with a warning) if missing or failing its checksum."""
    checksum = path.with_name(path.name + ".sha256")
    if not path.exists() or not checksum.exists():
        return None
    raw = path.read_bytes()
    if [_sha256(raw)] != checksum.read_text().split()[:1]:
        logging.warning("the cached classifier %s fails its sha256 check; retraining it", path)
        return None
    state = serialization.msgpack_restore(raw)
    return Classifier(jax.tree.map(jnp.asarray, state["params"]),
                      float(state["test_accuracy"]))


def _write(path: pathlib.Path, classifier: Classifier) -> None:
    raw = serialization.msgpack_serialize({
        "params": jax.tree.map(np.asarray, classifier.params),
        "test_accuracy": classifier.test_accuracy, "version": VERSION})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for target, content in ((path, raw), (path.with_name(path.name + ".sha256"),
                                              f"{_sha256(raw)}  {path.name}\n".encode())):
            tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(content)
            os.replace(tmp, target)  # atomic: a concurrent reader sees old or new
    except OSError as e:
        raise ClassifierError(f"cannot cache the classifier in {path.parent}: {e}. Set "
                              "--config.eval.classifier_dir to a writable directory.") from e


def load_or_train(train_images: np.ndarray, train_labels: np.ndarray,
                  test_images: np.ndarray, test_labels: np.ndarray, epochs: int,
                  cache_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> Classifier:
    """The cached classifier for this data, trained and cached first if needed."""
    cache_dir = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    key = fingerprint(train_images, train_labels, test_images, test_labels, epochs=epochs)
    path = cache_dir / f"classifier-{key}.msgpack"
    classifier = _read(path)
    if classifier is None:
        logging.info("training the Fashion-MNIST feature classifier (%d epochs) -> %s",
                     epochs, path)
        classifier = train(train_images, train_labels, test_images, test_labels, epochs,
                           progress)
        _write(path, classifier)
    return classifier
