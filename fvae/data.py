"""Fashion-MNIST as uint8 arrays, read from the four original IDX .gz files.

The files are checked against their published md5s before they are parsed, so a
corrupt or truncated download is rejected instead of half-used. Missing files are
fetched from the official source; without a network the fetch fails within seconds
with a message saying how to point `data.dir` at local copies.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import os
import pathlib
import socket
import struct
import tempfile
import urllib.error
import urllib.request

import numpy as np

BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DATA_DIR_ENV = "FVAE_DATA_DIR"
DOWNLOAD_TIMEOUT_S = 10.0

# name -> md5 of the .gz file, as published by Zalando Research.
FILES = {
    "train_images": ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "train_labels": ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
    "test_images": ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
}

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class DataError(RuntimeError):
    """The data is missing, corrupt or unreachable; the message says what to do."""


# The seed of the validation split (data.validation_size images of the training set).
VALIDATION_SEED = 20170825  # Fashion-MNIST's release date


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Images as uint8 [N, 28, 28] and labels as uint8 [N]: the training images, those
    held out of them for validation (empty as a loader returns them), and the test set."""
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    validation_images: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros((0, 28, 28), np.uint8))
    validation_labels: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros((0,), np.uint8))


def default_data_dir() -> pathlib.Path:
    """$FVAE_DATA_DIR if set, else a per-user cache directory."""
    if os.environ.get(DATA_DIR_ENV):
        return pathlib.Path(os.environ[DATA_DIR_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return pathlib.Path(cache).expanduser() / "fvae" / "fashion_mnist"


def md5sum(path: pathlib.Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_idx(raw: bytes, name: str = "file") -> np.ndarray:
    """Decodes an uncompressed IDX byte string (uint8 data) to an array."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{name} is not an IDX file (bad magic number).")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise DataError(f"{name} holds IDX type 0x{dtype_code:02x}; only uint8 (0x08) "
                        "is supported.")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name} is truncated: its header is incomplete.")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        raise DataError(f"{name} has {len(raw)} bytes but its header {shape} implies "
                        f"{expected}: the file is truncated or corrupt. Delete it and "
                        "fetch it again.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_gz(path: pathlib.Path) -> np.ndarray:
    with open(path, "rb") as f:
        head = f.read(3)
    if head[:2] == b"\0\0" and head[2:] == b"\x08":  # an IDX file, never gzipped
        raise DataError(f"{path} is an uncompressed IDX file under a .gz name: compress "
                        f"it (gzip -k) or put the original .gz download in its place.")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path} is not a readable gzip file ({e}): it is truncated or "
                        "corrupt. Delete it and fetch it again.") from e
    return parse_idx(raw, str(path))


def _no_data_message(data_dir: pathlib.Path, reason: str) -> str:
    return (f"Fashion-MNIST is not available in {data_dir} ({reason}). Put the four "
            f"original files ({', '.join(f for f, _ in FILES.values())}) in a "
            f"directory and point fvae at it with --config.data.dir=DIR or "
            f"{DATA_DIR_ENV}=DIR.")


def download(filename: str, md5: str | None, data_dir: pathlib.Path,
             base_url: str = BASE_URL, timeout: float = DOWNLOAD_TIMEOUT_S) -> pathlib.Path:
    """Fetches one file into data_dir atomically; the checksum is checked before use."""
    from tqdm.auto import tqdm

    data_dir.mkdir(parents=True, exist_ok=True)
    target = data_dir / filename
    url = base_url + filename
    part = None  # the partial file, removed however the download ends unless installed
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tempfile.NamedTemporaryFile(dir=data_dir, delete=False,
                                             suffix=".part") as tmp, \
                    tqdm(total=total, unit="B", unit_scale=True, desc=filename,
                         leave=False) as bar:
                part, written = pathlib.Path(tmp.name), 0
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    tmp.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
        if total is not None and written != total:  # a closed connection reads as the end
            raise DataError(_no_data_message(
                data_dir, f"the download of {url} broke off after {written} of {total} "
                "bytes; try again"))
        if md5 is not None and md5sum(part) != md5:
            raise DataError(f"the download of {url} has the wrong checksum; try again later "
                            "or fetch the file by hand.")
        os.replace(part, target)
        part = None
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError,
            http.client.HTTPException) as e:
        raise DataError(_no_data_message(data_dir, f"downloading {url} failed: {e}")) from e
    finally:
        if part is not None:
            part.unlink(missing_ok=True)
    return target


def ensure_files(data_dir: str | os.PathLike | None = None, *, allow_download: bool = True,
                 verify_checksums: bool = True, base_url: str = BASE_URL,
                 checksums: dict[str, str] | None = None) -> dict[str, pathlib.Path]:
    """Paths of the four files, fetched if missing (when allowed) and checksummed.

    `checksums` maps file names to md5s and replaces the published ones (for tests).
    """
    data_dir = pathlib.Path(data_dir).expanduser() if data_dir else default_data_dir()
    paths = {}
    for key, (filename, published_md5) in FILES.items():
        md5 = (checksums or {}).get(filename, published_md5) if verify_checksums else None
        path = data_dir / filename
        if not path.exists():
            if not allow_download:
                raise DataError(_no_data_message(data_dir, f"{filename} is missing and "
                                                 "data.download is off"))
            path = download(filename, md5, data_dir, base_url)
        if md5 is not None and (actual := md5sum(path)) != md5:
            raise DataError(f"{path} has md5 {actual}, but the published file has {md5}: "
                            "it is corrupt or truncated. Delete it so it is fetched again, "
                            "or replace it with an original copy.")
        paths[key] = path
    return paths


def load_fashion_mnist(data_dir: str | os.PathLike | None = None, **kwargs) -> Dataset:
    """Loads both splits from the IDX files (keyword arguments: see ensure_files)."""
    paths = ensure_files(data_dir, **kwargs)
    dataset = Dataset(**{key: read_idx_gz(path) for key, path in paths.items()})
    _check_consistent(dataset, paths["train_images"].parent)
    return dataset


def _check_consistent(ds: Dataset, data_dir: pathlib.Path) -> None:
    for split in ("train", "test"):
        images, labels = getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels")
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(f"{split} images in {data_dir} have shape {images.shape}, "
                            "expected [N, 28, 28].")
        if labels.shape != (images.shape[0],):
            raise DataError(f"{split} labels in {data_dir} have shape {labels.shape}, "
                            f"expected [{images.shape[0]}] to match the images.")


def load_tfds(data_dir: str | os.PathLike | None = None, **kwargs) -> Dataset:
    """Loads Fashion-MNIST through tensorflow-datasets (the `tfds` extra), offline.

    TFDS's own builder prepares the dataset from the same local IDX files (checked by
    `ensure_files`, keyword arguments as there), in their original order, into
    <data_dir>/tfds/<checksum>/ so a changed file never reuses a stale cache.
    """
    try:
        import tensorflow_datasets as tfds
        from tensorflow_datasets.core.download import checksums as tfds_checksums
        from tensorflow_datasets.image_classification import mnist as tfds_mnist
    except ImportError as e:
        raise DataError("data.source='tfds' needs tensorflow-datasets and TensorFlow: "
                        "pip install -e '.[tfds]'") from e
    paths = ensure_files(data_dir, **kwargs)
    local = paths["train_images"].parent
    base = tfds_mnist.FashionMNIST
    url_infos = {base.URL + p.name: tfds_checksums.compute_url_info(str(p))
                 for p in paths.values()}
    fingerprint = hashlib.sha256("".join(sorted(i.checksum for i in url_infos.values()))
                                 .encode()).hexdigest()[:12]

    class LocalFashionMNIST(base, skip_registration=True):
        """TFDS's builder reading local files: our checksums, IDX order, any size."""
        name = "fashion_mnist"

        def _info(self):
            info = super()._info()
            info.as_proto.disable_shuffling = True  # keep the IDX order
            return info

        def _split_generators(self, dl_manager):
            splits = super()._split_generators(dl_manager)
            for split in splits:  # TFDS hard-codes 60000/10000 examples
                with open(split.gen_kwargs["label_path"], "rb") as f:
                    split.gen_kwargs["num_examples"] = int.from_bytes(f.read(8)[4:], "big")
            return splits

    LocalFashionMNIST.url_infos = url_infos
    builder = LocalFashionMNIST(data_dir=str(local / "tfds" / fingerprint))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(local), try_download_gcs=False))
    arrays = {}
    for split in ("train", "test"):
        ds = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1,
                                              shuffle_files=False))
        arrays[f"{split}_images"] = ds["image"][..., 0].astype(np.uint8)
        arrays[f"{split}_labels"] = ds["label"].astype(np.uint8)
    dataset = Dataset(**arrays)
    _check_consistent(dataset, local)
    return dataset


def validation_split(num_train: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, validation indices), each in the files' order: `size` of
    `num_train` images drawn with VALIDATION_SEED, the same for every run (and a
    smaller size's images are a subset of a larger one's)."""
    if not 0 < size < num_train:
        raise DataError(f"data.validation_size={size} must leave training images of the "
                        f"{num_train} there are: set it between 1 and {num_train - 1}.")
    order = np.random.default_rng(VALIDATION_SEED).permutation(num_train)
    return np.sort(order[size:]), np.sort(order[:size])


def load(config) -> Dataset:
    """Loads the dataset the config's `data` block describes: the validation images
    held out of the training set first, then the limits applied."""
    loader = load_tfds if config.data.source == "tfds" else load_fashion_mnist
    ds = loader(config.data.dir, allow_download=config.data.download,
                verify_checksums=config.data.verify_checksums)
    train, held_out = validation_split(len(ds.train_images), config.data.validation_size)
    train = train[:config.data.limit_train or len(train)]
    n_test = config.data.limit_test or len(ds.test_images)
    return Dataset(ds.train_images[train], ds.train_labels[train],
                   ds.test_images[:n_test], ds.test_labels[:n_test],
                   ds.train_images[held_out], ds.train_labels[held_out])


def write_files(directory: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Writes {'train_images': ..., 'train_labels': ..., 'test_images': ...,
    'test_labels': ...} as the four IDX .gz files, named as published (for tests and
    tools)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for key, (filename, _) in FILES.items():
        write_idx_gz(directory / filename, arrays[key])


def write_idx_gz(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes a uint8 array as a gzipped IDX file (for tests and tools)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())
