"""What the two command-line modules share (``tur_ext.cli``, the ``tur`` entry point, and ``tur_ext.deploy_cli``,
its ``export``/``restore`` subcommands): an argument parser that reports usage errors through the return value, and
the one place where exceptions become one-line messages and exit codes. Neither module imports the other's entry
point, so the library never depends on the CLI."""
from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from typing import Callable, Mapping, Optional, Sequence

__all__ = ["DEBUG_FLAG", "OS_ERROR_EXIT", "Parser", "UsageError", "describe_os_error", "run_command"]


#: Exit status for operating-system errors (disk full, read-only or forbidden folders).
OS_ERROR_EXIT = 3

#: Anywhere on a command line (or ``TUR_DEBUG=1`` in the environment): errors also print their Python traceback.
DEBUG_FLAG = "--debug"
DEBUG_HELP = (f"{DEBUG_FLAG} anywhere on the line (or TUR_DEBUG=1) prints the Python traceback of an error; "
              f"exit status: 0 ok, 1 failure, 2 usage or config error, {OS_ERROR_EXIT} disk or permission error, "
              f"130 interrupted")


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: ``no space left on <path>``, ``<path> is on a read-only file system`` and so on."""
    where = e.filename or "the output folder"
    if e.errno == errno.ENOSPC:
        return f"no space left on {where!s} (free some space or write elsewhere)"
    if e.errno == errno.EROFS:
        return f"{where!s} is on a read-only file system; choose a writable output folder"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied for {where!s}"
    return f"{e.strerror or e}: {where!s}"


class UsageError(Exception):
    """A command-line usage error (exit code 2), raised by :class:`Parser` instead of ``sys.exit``."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # exit code 2 with the usage, as argparse does, but through the return value
        self.print_usage(sys.stderr)
        raise UsageError(f"{self.prog}: error: {message}")


def run_command(parser: argparse.ArgumentParser, commands: Mapping[str, Callable[[argparse.Namespace], int]],
                argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and run its subcommand (``commands[args.command]``, else the ``func`` its subparser set).
    Returns the exit status: the command's, 2 for usage and config errors, 1 for a failure reported in one line,
    3 for operating-system errors (disk full, read-only folder), 130 when interrupted. Every error is one line;
    ``--debug`` (anywhere in ``argv``) or ``TUR_DEBUG=1`` adds the traceback."""
    from .train.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    # A flag that may follow the subcommand or its options, so it is taken out before argparse sees the line.
    debug = DEBUG_FLAG in argv or os.environ.get("TUR_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    if not parser.epilog:
        parser.epilog = DEBUG_HELP
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    name = f"tur {args.command}"

    def fail(message: str, status: int) -> int:
        if debug:
            traceback.print_exc()
        print(f"{name}: {message}", file=sys.stderr)
        return status

    try:
        command = commands.get(args.command) or args.func
        return command(args)
    except ConfigError as e:
        return fail(f"config error: {e}", 2)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError, RuntimeError, MemoryError) as e:
        return fail(f"error: {e}", 1)
    except OSError as e:  # a full disk, a read-only or forbidden folder: the path and the reason, one line
        return fail(f"error: {describe_os_error(e)}", OS_ERROR_EXIT)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except Exception as e:  # a bug of ours or an unexpected library error: still one line, with the way to see more
        hint = "" if debug else f" (rerun with {DEBUG_FLAG} for the traceback)"
        return fail(f"unexpected error: {type(e).__name__}: {e}{hint}", 1)
