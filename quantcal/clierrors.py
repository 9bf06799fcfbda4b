"""The command line's error contract: every way a command can end badly is one line.

A :class:`QuantcalError`, an OS fault (no space, read-only, permission) or a click usage
error ends the command with one line on stderr, ``quantcal: error: ...``, and exit status 2;
Ctrl-C (and ``kill``, through :func:`terminate`) ends it with status 130 and says what the
interrupted stage kept, when it knows. Under torchrun only rank 0 prints that line. Every
command first checks that the installed dependencies are recent enough
(:func:`quantcal.versions.check_versions`), after its options are parsed, so ``--help``
works in any environment.
"""

from __future__ import annotations

import os
import sys

import click

from quantcal.errors import QuantcalError, os_error_line
from quantcal.versions import check_versions


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _say(line: str) -> None:
    """``line`` on stderr, except on a rank of torchrun other than 0: rank 0 speaks for all
    (a follower's own error reaches it, :mod:`quantcal.calibrate.distributed`), so a
    failure is one line however many ranks there are."""
    if os.environ.get("RANK", "0") == "0" or "WORLD_SIZE" not in os.environ:
        click.echo(line, err=True)


class QuantcalCommand(click.Command):
    """A command that refuses too old dependencies before its work."""

    def invoke(self, ctx: click.Context):
        check_versions()
        return super().invoke(ctx)


class QuantcalGroup(click.Group):
    """Turns user errors, OS faults and interrupts into one-line messages; its commands are
    :class:`QuantcalCommand`."""

    command_class = QuantcalCommand

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QuantcalError as exc:
            _say(f"quantcal: error: {_one_line(exc)}")
            ctx.exit(2)
        except OSError as exc:
            _say(f"quantcal: error: {_one_line(os_error_line(exc))}")
            ctx.exit(2)
        except KeyboardInterrupt as exc:
            said = _one_line(exc)
            _say("quantcal: interrupted" + (f"; {said}" if said else ""))
            ctx.exit(130)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        """Click's main, but a usage error is one line (no usage block, no 'Try' hint)."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "quantcal"
            _say(f"quantcal: error: {_one_line(exc.format_message())} "
                 f"(see `{where} --help`)")
            sys.exit(2)
        except click.ClickException as exc:
            _say(f"quantcal: error: {_one_line(exc.format_message())}")
            sys.exit(exc.exit_code)
        except click.Abort:
            _say("quantcal: interrupted")
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


def terminate(signum, frame):
    """SIGTERM handler: ``kill PID`` ends a stage as Ctrl-C does, nothing half-committed."""
    raise KeyboardInterrupt
