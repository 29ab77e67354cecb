"""The console entry point: a failed command prints one readable paragraph, not a traceback.

``fusion_diff.cli.main`` raises the library's own errors (``fusion_diff.errors``) so that callers and tests can
catch them; ``run_cli`` is what ``fusion-diff`` and ``python -m fusion_diff.cli`` run. It turns those errors and
the predictable OS errors (no permission, read-only or full disk, a missing path, a file where a folder belongs)
into one paragraph on stderr (what failed, the file or key, the fix) and exit code 1. ``--debug`` (anywhere on
the command line) or ``FUSION_DIFF_DEBUG=1`` adds the full traceback. Argument errors keep argparse's exit
code 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from fusion_diff.errors import FusionDiffError

DEBUG_FLAG = "--debug"
DEBUG_ENV = "FUSION_DIFF_DEBUG"
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
# Flags whose value is where a command writes: named when a full disk does not say which file it was writing.
OUTPUT_FLAGS = ("--out", "--output-dir", "--cache", "--cache-dir")


def run_cli(
    argv: Sequence[str] | None = None, main: Callable[[list[str]], int] | None = None, prog: str = "fusion-diff"
) -> int:
    """Run ``fusion-diff ARGV`` (or another ``main`` such as an entry script's) and return its exit code; failures
    are reported on stderr, not raised."""
    if main is None:
        from fusion_diff.cli import main

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in _options(argv) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = strip_debug_flag(argv)
    command = _command_name(prog, argv)
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"\n{command}: interrupted; resumable steps continue where they stopped when run again.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as err:  # argparse (exit 2) and --help (exit 0) end here on purpose
        if err.code is None or isinstance(err.code, int):
            return err.code or 0
        print(f"{command}: {err.code}", file=sys.stderr)  # sys.exit("message"), as Python itself reports it
        return EXIT_FAILED
    except Exception as err:  # noqa: BLE001  (the console's last line of defence: every failure is reported)
        print(describe_failure(err, command, argv, debug), file=sys.stderr)
        if debug:
            traceback.print_exc(file=sys.stderr)
        return EXIT_FAILED


def entry() -> None:
    """``[project.scripts] fusion-diff``."""
    sys.exit(run_cli())


def strip_debug_flag(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--debug`` (which may stand anywhere before a ``--``)."""
    options = _options(argv)
    return [arg for i, arg in enumerate(argv) if not (arg == DEBUG_FLAG and i < len(options))]


def describe_failure(err: BaseException, command: str, argv: Sequence[str], debug: bool) -> str:
    """One paragraph: the command, what failed (the error's own message for the library's errors), the fix."""
    hint = "" if debug else f" (run again with {DEBUG_FLAG} for the traceback)"
    if isinstance(err, FusionDiffError):
        return f"{command}: {one_paragraph(str(err))}"
    if isinstance(err, OSError) and (message := _os_error_message(err, argv)):
        return f"{command}: {message}"
    return (
        f"{command}: unexpected {type(err).__name__}: {one_paragraph(str(err)) or '(no message)'}. This is a bug in "
        f"fusion-diff, not in your input; please report it with the command line{hint}."
    )


def one_paragraph(text: str) -> str:
    """``text`` on one line: a multi-line message reads as one paragraph in a terminal and in a log."""
    return " ".join(text.split())


def _os_error_message(err: OSError, argv: Sequence[str]) -> str | None:
    """The predictable OS failures, each with its path and fix; None for any other (reported as a bug)."""
    path = err.filename
    if err.errno == errno.ENOSPC:
        where = path or _output_path(argv)
        target = f"while writing {where}" if where else "while writing the output"
        return f"no space left on the device {target}. Free some space or write to another disk."
    if err.errno == errno.EROFS:
        return f"{path or 'the output'} is on a read-only file system. Write to a writable folder instead."
    if isinstance(err, PermissionError):
        return f"permission denied for {path or 'a file'}. Choose a folder you can write to, or change its permissions."
    if isinstance(err, FileNotFoundError):
        return f"{path or 'a file'} does not exist. Check the path (relative paths start at {os.getcwd()})."
    if isinstance(err, IsADirectoryError):
        return f"{path} is a folder where a file is expected. Pass a file path."
    if isinstance(err, (NotADirectoryError, FileExistsError)) and (file := _file_in_the_way(path)):
        held = "" if file == str(path) else f" (to hold {path})"
        return f"{file} is a file where a folder is expected{held}. Pass a folder path, or move the file."
    if isinstance(err, FileExistsError):
        return f"{path} exists already and is in the way. Remove it or choose another path."
    return None


def _file_in_the_way(path: str | None) -> str | None:
    """``path`` or its nearest existing ancestor, when that is a file (a folder was to be made there)."""
    if not path:
        return None
    for candidate in (Path(path), *Path(path).parents):
        if candidate.exists():
            return str(candidate) if candidate.is_file() else None
    return None


def _options(argv: Sequence[str]) -> list[str]:
    """The arguments before a ``--`` separator (after it everything is a value)."""
    argv = list(argv)
    return argv[: argv.index("--")] if "--" in argv else argv


def _command_name(prog: str, argv: Sequence[str]) -> str:
    """``fusion-diff embed images`` from the leading words of ``argv`` (for the message's first words)."""
    words = []
    for arg in argv:
        if arg.startswith("-") or any(c in arg for c in "=/.") or len(words) == 2:
            break
        words.append(arg)
    return " ".join([prog, *words])


def _output_path(argv: Sequence[str]) -> str | None:
    """The value of the command's output flag, if it has one."""
    for i, arg in enumerate(argv):
        flag, sep, value = arg.partition("=")
        if flag in OUTPUT_FLAGS:
            return value if sep else (argv[i + 1] if i + 1 < len(argv) else None)
    return None
