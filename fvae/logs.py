"""Log lines for people: INFO from fvae itself, warnings and errors from every library."""

from __future__ import annotations

import logging
import os

from absl import logging as absl_logging

OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class OwnInfoOnly(logging.Filter):
    """Passes INFO records from fvae's files (and `extra_files`) only; Orbax, for one,
    logs a dozen INFO lines per checkpoint save."""

    def __init__(self, *extra_files: str):
        super().__init__()
        self.prefixes = (OWN_DIR, *map(os.path.abspath, extra_files))

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or \
            os.path.abspath(record.pathname).startswith(self.prefixes)


def show_own_info(*extra_files: str) -> None:
    """INFO verbosity for an absl entry point, without the libraries' INFO lines."""
    absl_logging.set_verbosity(absl_logging.INFO)
    absl_logging.get_absl_handler().addFilter(OwnInfoOnly(*extra_files))
