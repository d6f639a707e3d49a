"""fvae.provenance: what made a number, recorded with it."""

import json
import subprocess

import jax

from fvae import configs, provenance


def test_the_record_names_the_code_libraries_machine_and_command():
    config = configs.get_base_config()
    record = provenance.record(config)
    assert set(record) == {"time", "command", "code", "versions", "machine"}
    head = subprocess.run(["git", "-C", str(provenance.SOURCE_DIR), "rev-parse", "HEAD"],
                          capture_output=True, text=True)
    if head.returncode == 0 and (provenance.SOURCE_DIR / ".git").exists():  # a checkout
        assert record["code"]["commit"] == head.stdout.strip()
        assert isinstance(record["code"]["dirty"], bool)
    else:  # an installed fvae
        assert record["code"]["commit"] is None
    assert record["versions"]["jax"] == jax.__version__
    assert set(provenance.LIBRARIES) <= set(record["versions"])
    machine = record["machine"]
    assert machine["backend"] == jax.default_backend()
    assert machine["device_count"] == jax.device_count() and machine["cpu"]
    assert machine["runtime"] == configs.flatten(config.runtime)
    assert "xla_flags" in machine and record["command"]
    json.dumps(record)  # JSON as it is


def test_sessions_append_and_a_bad_file_never_stops_anything(tmp_path):
    assert provenance.read(tmp_path) == []
    provenance.append(tmp_path, {"start_step": 0})
    provenance.append(tmp_path, {"start_step": 8})
    assert [s["start_step"] for s in provenance.read(tmp_path)] == [0, 8]
    (tmp_path / provenance.FILE).write_text("{not json")
    assert provenance.read(tmp_path) == []


def test_differences_name_what_differs():
    a = {"code": {"commit": "abc", "dirty": False}, "versions": {"jax": "0.10.0"}}
    b = {"code": {"commit": "def", "dirty": False}, "versions": {"jax": "0.10.1"}}
    found = provenance.differences({"one": a, "two": b})
    assert any(f.startswith("code commit differs: one: abc, two: def") for f in found)
    assert any(f.startswith("jax version differs") for f in found)
    assert provenance.differences({"one": a, "two": a}) == []


def test_a_git_repository_around_an_installed_fvae_is_not_its_code(tmp_path, monkeypatch):
    """site-packages inside a project's git checkout (a .venv): that repository's
    commit says nothing about fvae's code; the installed version does."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    site = tmp_path / ".venv" / "site-packages"
    site.mkdir(parents=True)
    monkeypatch.setattr(provenance, "SOURCE_DIR", site)
    found = provenance.code()
    assert found["commit"] is None and "version" in found
