"""What every command-line entry point shares: expected failures (a bad config, bad data, a checkpoint that cannot
be used) are printed as their message and the command exits 2, with no traceback; `--debug` (or SSFT_DEBUG=1) shows
the traceback. Console scripts (`ssft-train`, `ssft-eval`, ...) are declared in pyproject.toml."""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

EXIT_USER_ERROR = 2


def expected_errors() -> tuple[type[BaseException], ...]:
    """The errors whose message says what to fix (naming the field, record or step). A CLI adds its own
    (`run_reporting_errors(extra=...)`), so this module imports none of the CLIs."""
    from ssft_jax.checkpoint import CheckpointError
    from ssft_jax.config import ConfigError
    from ssft_jax.data import DataError
    return ConfigError, DataError, CheckpointError, FileNotFoundError


def debug_requested(argv: list[str] | None = None) -> bool:
    argv = sys.argv if argv is None else argv
    return os.environ.get("SSFT_DEBUG", "") not in ("", "0") or "--debug" in argv or "--debug=true" in argv


def run_reporting_errors(fn: Callable[[], int | None], argv: list[str] | None = None,
                         extra: tuple[type[BaseException], ...] = ()) -> int:
    """Run `fn`; an expected error becomes `error: <message>` on stderr and exit code 2 (traceback with --debug)."""
    try:
        return int(fn() or 0)
    except expected_errors() + tuple(extra) as e:
        if debug_requested(argv):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        if not debug_requested(argv):
            print("(run with --debug or SSFT_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_USER_ERROR
