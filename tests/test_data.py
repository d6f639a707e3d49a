import functools
import gzip
import http.server
import threading
import time

import numpy as np
import pytest

from conftest import write_dataset
from fvae import data


def test_idx_roundtrip(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (7, 28, 28)).astype(np.uint8)
    data.write_idx_gz(tmp_path / "x.gz", array)
    np.testing.assert_array_equal(data.read_idx_gz(tmp_path / "x.gz"), array)


def test_loads_with_checksums(tmp_path):
    checksums = write_dataset(tmp_path)
    ds = data.load_fashion_mnist(tmp_path, allow_download=False, checksums=checksums)
    assert ds.train_images.shape == (320, 28, 28) and ds.train_images.dtype == np.uint8
    assert ds.test_labels.shape == (64,)


def test_published_checksums_reject_other_files(tmp_path):
    write_dataset(tmp_path)
    with pytest.raises(data.DataError, match="corrupt or truncated"):
        data.load_fashion_mnist(tmp_path, allow_download=False)


def test_truncated_file_is_rejected(tmp_path):
    checksums = write_dataset(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(data.DataError, match="corrupt or truncated"):
        data.load_fashion_mnist(tmp_path, allow_download=False, checksums=checksums)
    # Without checksums the decoder still refuses it.
    with pytest.raises(data.DataError, match="truncated or corrupt"):
        data.load_fashion_mnist(tmp_path, allow_download=False, verify_checksums=False)


def test_idx_length_mismatch_is_rejected(tmp_path):
    path = tmp_path / "bad.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + (5).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
                + bytes(100))
    with pytest.raises(data.DataError, match="truncated or corrupt"):
        data.read_idx_gz(path)


def test_an_uncompressed_idx_file_under_a_gz_name_is_named_as_such(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes(3))
    with pytest.raises(data.DataError, match="uncompressed IDX file.*gzip"):
        data.read_idx_gz(path)


def test_missing_files_without_download_say_how_to_fix(tmp_path):
    with pytest.raises(data.DataError, match="data.dir"):
        data.load_fashion_mnist(tmp_path / "empty", allow_download=False)


def test_no_network_fails_fast(tmp_path):
    # Port 9 on loopback refuses the connection at once, like an offline machine.
    start = time.time()
    with pytest.raises(data.DataError, match="--config.data.dir"):
        data.load_fashion_mnist(tmp_path, base_url="http://127.0.0.1:9/")
    assert time.time() - start < 10
    assert not list(tmp_path.glob("*.gz")), "no partial file may be left behind"


@pytest.fixture
def file_server(tmp_path):
    served = tmp_path / "served"
    checksums = write_dataset(served)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", checksums
    server.shutdown()


def test_download_fetches_and_verifies(tmp_path, file_server):
    url, checksums = file_server
    ds = data.load_fashion_mnist(tmp_path / "cache", base_url=url, checksums=checksums)
    assert ds.train_images.shape == (320, 28, 28)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        f for f, _ in data.FILES.values())


def test_download_with_wrong_checksum_keeps_nothing(tmp_path, file_server):
    url, checksums = file_server
    bad = {name: "0" * 32 for name in checksums}
    with pytest.raises(data.DataError, match="wrong checksum"):
        data.load_fashion_mnist(tmp_path / "cache", base_url=url, checksums=bad)
    assert not list((tmp_path / "cache").iterdir())


class HalfSent(http.server.BaseHTTPRequestHandler):
    """Promises 1000 bytes, sends 100 and closes the connection."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"\x1f\x8b" + b"x" * 98)

    def log_message(self, *args):
        pass


def test_a_download_that_breaks_off_is_not_kept_even_unchecked(tmp_path):
    """Without a checksum to catch it, the promised length does: no partial file is
    installed under the final name, and no .part file is left behind."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HalfSent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(data.DataError, match="broke off after 100 of 1000 bytes"):
            data.download("train-images-idx3-ubyte.gz", None, tmp_path / "cache",
                          base_url=f"http://127.0.0.1:{server.server_address[1]}/")
    finally:
        server.shutdown()
    assert not list((tmp_path / "cache").iterdir())


def test_default_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert data.default_data_dir() == tmp_path


TFDS_SCRIPT = """
import sys, numpy as np
from fvae import data
directory = sys.argv[1]
idx = data.load_fashion_mnist(directory, allow_download=False, verify_checksums=False)
via_tfds = data.load_tfds(directory, allow_download=False, verify_checksums=False)
for field in ("train_images", "train_labels", "test_images", "test_labels"):
    a, b = getattr(idx, field), getattr(via_tfds, field)
    assert a.dtype == b.dtype and np.array_equal(a, b), field
print("tfds matches idx", via_tfds.train_images.shape, via_tfds.test_images.shape)
"""


def test_tfds_source_reads_the_same_local_files_offline(tmp_path):
    """The TFDS path on tiny files, in a subprocess (TensorFlow and JAX stay apart),
    with any network use made to fail. CI installs the `tfds` extra and sets
    FVAE_REQUIRE_TFDS=1 so this cannot be skipped there."""
    import importlib.util
    import os
    import subprocess
    import sys
    if importlib.util.find_spec("tensorflow_datasets") is None:
        if os.environ.get("FVAE_REQUIRE_TFDS"):
            pytest.fail("tensorflow-datasets is not installed: pip install -e '.[tfds]'")
        pytest.skip("the tfds extra is not installed")
    write_dataset(tmp_path)
    env = {**os.environ, "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", TFDS_SCRIPT, str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tfds matches idx (320, 28, 28) (64, 28, 28)" in result.stdout


def test_the_validation_split_is_fixed_disjoint_and_nested():
    """Every run of a size holds out the same images; a smaller split's images are a
    subset of a larger one's; together with the rest they are the whole set, once."""
    train, held = data.validation_split(1000, 100)
    again_train, again_held = data.validation_split(1000, 100)
    np.testing.assert_array_equal(held, again_held)
    np.testing.assert_array_equal(train, again_train)
    assert len(held) == 100 and np.all(np.diff(held) > 0) and np.all(np.diff(train) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, held])), np.arange(1000))
    assert set(data.validation_split(1000, 30)[1]) <= set(held)
    assert not set(held) <= set(range(100))  # drawn, not the first images
    for size in (0, 1000):
        with pytest.raises(data.DataError, match="data.validation_size"):
            data.validation_split(1000, size)


def test_load_holds_validation_out_before_the_training_limit(tiny_data_dir):
    from conftest import tiny_config
    whole = data.load(tiny_config(tiny_data_dir, **{"data.validation_size": 64}))
    assert len(whole.train_images) == 256 and len(whole.validation_images) == 64
    raw = data.load_fashion_mnist(tiny_data_dir, allow_download=False, verify_checksums=False)
    train, held = data.validation_split(320, 64)
    np.testing.assert_array_equal(whole.validation_images, raw.train_images[held])
    np.testing.assert_array_equal(whole.validation_labels, raw.train_labels[held])
    limited = data.load(tiny_config(tiny_data_dir, **{"data.limit_train": 100}))
    np.testing.assert_array_equal(limited.train_images, raw.train_images[train[:100]])
    np.testing.assert_array_equal(limited.validation_images, whole.validation_images)
