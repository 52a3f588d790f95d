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
    if not debug_requested(argv):
        _quiet_leftovers()
    try:
        return int(fn() or 0)
    except expected_errors() + tuple(extra) as e:
        if debug_requested(argv):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        if not debug_requested(argv):
            print("(run with --debug or SSFT_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_USER_ERROR


def _quiet_leftovers() -> None:
    """A failed orbax restore leaves its read coroutines in flight; their TensorStore callbacks fire once the event
    loop is closed and each prints an 'Event loop is closed' traceback around the one error message. Drop those
    (only those; --debug keeps them)."""
    default = sys.unraisablehook

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)):
            default(unraisable)
    sys.unraisablehook = hook


def _cut_traceback(text: str) -> str:
    """'flag --config=...: Error whilst parsing config file:<traceback>' -> the flag and the exception's own line."""
    if "Traceback (most recent call last)" not in text:
        return text
    head = text.split("Traceback (most recent call last)")[0].strip().rstrip(":")
    last = [line.strip() for line in text.splitlines() if line.strip()][-1]
    last = last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last
    return f"{head.split(': Error whilst')[0]}: {last}"


def _flag_error_message(e: BaseException, argv: list[str]) -> str:
    """One line for a command line absl or ml_collections could not parse, naming the flag where it can be found
    (ml_collections reports an unknown `--config.a.b` key as a bare AttributeError/KeyError naming only the key)."""
    import re
    raw = str(e).replace("\\n", "\n").replace("\\'", "'")
    lines = [line.strip().strip("'\"") for line in raw.splitlines() if line.strip().strip("'\"")]
    text = "; ".join(lines[:2]) or type(e).__name__
    if isinstance(e, (AttributeError, KeyError)) and lines:
        key = re.sub(r"\W", "", lines[0])
        hits = [a.split("=")[0] for a in argv if a.startswith("--") and "." in a
                and key in a.split("=")[0].split(".")]
        if hits:
            hint = f"; {lines[1]}" if len(lines) > 1 else ""
            return f"{hits[0]}: no such config field {key!r}{hint}"
    if "earlier failure to load" in text or "Failed loading config file" in str(e):
        tried = [line.strip() for line in str(e).splitlines() if "[Errno" in line or "No such file" in line]
        flag = next((a.split("=")[0] for a in argv if a.startswith("--config")), "--config")
        return f"{flag}: the config file cannot be loaded ({tried[-1] if tried else lines[-1]})"
    return text


def _packaged_configs(argv: list[str], resolve: Callable[[str], str]) -> list[str]:
    """`--config configs/X.py[:arg]` (either spelling) resolved by `resolve` (the project's configs from any folder)."""
    out, i = list(argv), 1
    while i < len(out):
        if out[i].startswith("--config="):
            out[i] = "--config=" + resolve(out[i][len("--config="):])
        elif out[i] == "--config" and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
            i += 1
        i += 1
    return out


def parse_absl_flags(argv: list[str]) -> list[str]:
    """absl's flags parser for our CLIs: every command line it cannot use is one `error:` line and exit code 2,
    like the run's own errors. absl alone exits 1 for a bad value and lets ml_collections' errors (an unknown
    `--config.a.b` key, a config file that does not exist) escape as 50-line tracebacks."""
    from absl import flags

    from ssft_jax.config import resolve_config_path
    argv = _packaged_configs(argv, resolve_config_path)
    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS:  # a config file that fails to load fails lazily, at first use: use it here
            config = getattr(flags.FLAGS, "config")
            if config is not None:  # ml_collections' stand-in for a failed load raises on first attribute access
                config.keys()
        return rest
    except flags.Error as e:  # a config file whose get_config raised comes as a flags.Error holding its traceback
        message = _cut_traceback(str(e))
    except Exception as e:  # noqa: BLE001  (ml_collections raises assorted types while parsing)
        if debug_requested(argv):
            traceback.print_exc()
        message = _flag_error_message(e, argv)
    print(f"error: {message}", file=sys.stderr)
    print(f"(see {os.path.basename(argv[0]) if argv else 'the command'} --help)", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def absl_run(main: Callable[[list[str]], int | None], *, extra: tuple[type[BaseException], ...] = ()) -> None:
    """`absl.app.run(main)` with our flag parser and error reporting: the whole CLI block of an absl command."""
    from absl import app
    app.run(lambda argv: sys.exit(run_reporting_errors(lambda: main(argv), extra=extra)), flags_parser=parse_absl_flags)
