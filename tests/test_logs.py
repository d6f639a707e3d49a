"""The log filter: fvae's INFO lines and every library's warnings, nothing else."""

import logging
import os

from fvae import logs


def record(path: str, level: int) -> logging.LogRecord:
    return logging.LogRecord("x", level, path, 1, "message", None, None)


def test_own_info_only_keeps_fvae_info_and_library_warnings(tmp_path):
    keep = logs.OwnInfoOnly(str(tmp_path / "launch.py"))
    library = "/site-packages/orbax/checkpoint/atomicity.py"
    assert not keep.filter(record(library, logging.INFO))
    assert keep.filter(record(library, logging.WARNING))
    assert keep.filter(record(os.path.join(logs.OWN_DIR, "train.py"), logging.INFO))
    assert keep.filter(record(str(tmp_path / "launch.py"), logging.INFO))
    assert not keep.filter(record(str(tmp_path / "other.py"), logging.INFO))
