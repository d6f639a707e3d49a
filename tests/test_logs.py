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


def test_a_librarys_error_traceback_is_cut_to_its_first_line(monkeypatch):
    keep = logs.OwnInfoOnly()
    try:
        raise ValueError("RESOURCE_EXHAUSTED: Error writing")
    except ValueError:
        import sys
        exc_info = sys.exc_info()
    error = logging.LogRecord("x", logging.ERROR, "/site-packages/orbax/future.py", 1,
                              "save thread raised: %s\nmore", ("boom",), exc_info)
    monkeypatch.delenv("FVAE_TRACEBACK", raising=False)
    assert keep.filter(error)
    assert logging.Formatter().format(error) == "save thread raised: boom"
    own = logging.LogRecord("x", logging.ERROR, os.path.join(logs.OWN_DIR, "train.py"), 1,
                            "ours", None, exc_info)
    assert keep.filter(own) and own.exc_info is exc_info  # fvae's own keep theirs
    empty = logging.LogRecord("x", logging.ERROR, "/site-packages/orbax/future.py", 1, "",
                              None, exc_info)
    assert keep.filter(empty) and empty.getMessage() == ""


def test_an_interrupt_is_one_line_and_exit_130(monkeypatch, capsys):
    import sys

    import pytest

    from fvae import launch
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # it sets its own
    monkeypatch.delenv("FVAE_TRACEBACK", raising=False)

    def interrupted(config):
        raise KeyboardInterrupt
    monkeypatch.setattr(launch, "run_mode", interrupted)
    monkeypatch.setattr(launch.configs, "validate", lambda config: config)
    import types
    monkeypatch.setattr(launch, "FLAGS", types.SimpleNamespace(config=None))
    with pytest.raises(SystemExit) as stopped:
        launch.main(["fvae-train"])
    assert stopped.value.code == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and "resume" in err
    monkeypatch.setenv("FVAE_TRACEBACK", "1")
    with pytest.raises(KeyboardInterrupt):
        launch.main(["fvae-train"])
