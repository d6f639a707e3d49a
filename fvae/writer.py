"""The run's metrics log: one JSON object per line in workdir/metrics.jsonl.

Any script can read it (`read_metrics`). When a run resumes from step s, the lines
written after step s by the interrupted run are dropped, so the log holds each
epoch exactly once.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible, not silently null
    return value


class MetricsWriter:
    """Appends records to metrics.jsonl; `resume_step` drops records past it."""

    def __init__(self, workdir: str | os.PathLike, resume_step: int | None = None):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path.parent) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh log

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({k: _jsonable(v) for k, v in record.items()})
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl; a torn last line (a killed run) is skipped."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    records = []
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
