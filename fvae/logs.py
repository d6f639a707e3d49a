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
        own = os.path.abspath(record.pathname).startswith(self.prefixes)
        if not own and record.exc_info and record.levelno >= logging.ERROR:
            # A library's error in a background thread (Orbax's failed save): its first
            # line, not its traceback; fvae reports the failure itself (FVAE_TRACEBACK=1
            # keeps the traceback).
            if not os.environ.get("FVAE_TRACEBACK"):
                record.exc_info, record.exc_text = None, None
                try:
                    first = (record.getMessage().splitlines() or [""])[0][:400]
                except Exception:  # noqa: BLE001 - a filter must never raise
                    first = str(record.msg)[:400]
                record.msg, record.args = first, ()
        return record.levelno >= logging.WARNING or own


def show_own_info(*extra_files: str) -> None:
    """INFO verbosity for an absl entry point, without the libraries' INFO lines."""
    absl_logging.set_verbosity(absl_logging.INFO)
    absl_logging.get_absl_handler().addFilter(OwnInfoOnly(*extra_files))


def show_flags_in_help(module_name: str) -> None:
    """Makes --help print the module's docstring (its examples) and flags under any entry
    point (fvae-train, python -m fvae train): absl prints those of __main__ alone."""
    import sys

    from absl import flags
    sys.modules["__main__"].__doc__ = sys.modules[module_name].__doc__
    for flag in flags.FLAGS.get_key_flags_for_module(module_name):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def exit_for_user_error(program: str, error: BaseException) -> None:
    """Ends the process on a user's mistake: one message naming the problem and the fix
    on stderr, exit status 2, no traceback (FVAE_TRACEBACK=1 shows it instead). A
    SyntaxError in a config file shows its file, line and caret."""
    import sys
    import traceback
    if os.environ.get("FVAE_TRACEBACK"):
        raise error
    if isinstance(error, SyntaxError):
        message = "".join(traceback.format_exception_only(error)).rstrip()
        print(f"{program}: the config file has a syntax error:\n{message}", file=sys.stderr)
    else:
        print(f"{program}: {type(error).__name__}: {error}", file=sys.stderr)
    _exit_quietly(2, wait_for_threads=not getattr(error, "abandons_threads", False))


def exit_interrupted(program: str) -> None:
    """Ends the process on a KeyboardInterrupt (a second Ctrl-C, or one where no run
    catches it, as in --mode eval): one line and exit status 130, no traceback. The
    checkpoints saved before it stay, so rerunning the command resumes."""
    import sys
    if os.environ.get("FVAE_TRACEBACK"):
        raise KeyboardInterrupt
    print(f"{program}: interrupted. Checkpoints saved before it are kept: rerun the same "
          "command to resume.", file=sys.stderr)
    _exit_quietly(130)


def _exit_quietly(status: int, wait_for_threads: bool = True) -> None:
    """Exits with `status` once the message is out. A failed save or an interrupt can
    leave Orbax's coroutines behind, whose teardown would print "Exception ignored ...
    Event loop is closed" by the hundred: not a user's concern. Without
    `wait_for_threads` (a failed save, whose files are closed and whose lock is
    released by now), the process does not wait for library threads still waiting for
    it: Orbax's time out after 5 minutes."""
    import sys
    sys.unraisablehook = lambda unraisable: None
    if not wait_for_threads:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
