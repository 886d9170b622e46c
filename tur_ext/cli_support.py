"""What the two command-line modules share (``tur_ext.cli``, the ``tur`` entry point, and ``tur_ext.deploy_cli``,
its ``export``/``restore`` subcommands): an argument parser that reports usage errors through the return value, and
the one place where exceptions become one-line messages and exit codes. Neither module imports the other's entry
point, so the library never depends on the CLI."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Mapping, Optional, Sequence

__all__ = ["Parser", "UsageError", "run_command"]


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
    130 when interrupted."""
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
    except KeyboardInterrupt:
        print(f"tur {args.command}: interrupted", file=sys.stderr)
        return 130
