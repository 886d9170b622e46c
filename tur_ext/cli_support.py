"""What the two command-line modules share (``tur_ext.cli``, the ``tur`` entry point, and ``tur_ext.deploy_cli``,
its ``export``/``restore`` subcommands): an argument parser that reports usage errors through the return value, and
the one place where exceptions become one-line messages and exit codes. Neither module imports the other's entry
point, so the library never depends on the CLI."""
from __future__ import annotations

import argparse
import errno
import sys
from typing import Callable, Mapping, Optional, Sequence

__all__ = ["OS_ERROR_EXIT", "Parser", "UsageError", "describe_os_error", "run_command"]


#: Exit status for operating-system errors (disk full, read-only or forbidden folders).
OS_ERROR_EXIT = 3


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
    3 for operating-system errors (disk full, read-only folder), 130 when interrupted."""
    from .train.config import ConfigError

    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    try:
        command = commands.get(args.command) or args.func
        return command(args)
    except ConfigError as e:
        print(f"tur {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError, RuntimeError) as e:
        print(f"tur {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a read-only or forbidden folder: the path and the reason, one line
        print(f"tur {args.command}: error: {describe_os_error(e)}", file=sys.stderr)
        return OS_ERROR_EXIT
    except KeyboardInterrupt:
        print(f"tur {args.command}: interrupted", file=sys.stderr)
        return 130
