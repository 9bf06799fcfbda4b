"""What the command line prints besides its results, as ``-q`` / ``-v`` set it.

Notices are warnings of the ``quantcal`` logger (a library never prints): the command line
shows each as one line on stderr, ``quantcal: ...``. ``-q`` (quiet) hides notices and
progress bars, quantcal's and those of transformers, the hub and datasets, and
transformers' own warnings; errors still print. ``-v`` (verbose) shows debug messages too,
and onnxruntime's log of a CUDA provider that fails to load. Both options are accepted
before the command name and after it. Reads and writes nothing.
"""

from __future__ import annotations

import logging

import click

LOGGER = "quantcal"
_QUIET, _VERBOSE = "quantcal.quiet", "quantcal.verbose"  # keys of click's shared ctx.meta


class _EchoHandler(logging.Handler):
    """One line per record on the current stderr (click's, so test runners capture it)."""

    def emit(self, record: logging.LogRecord) -> None:
        text = " ".join(self.format(record).split())
        click.echo(text if text.startswith("quantcal") else f"quantcal: {text}", err=True)


_HANDLER = _EchoHandler()


def configure_output(quiet: bool, verbose: bool) -> None:
    """Route the ``quantcal`` logger to stderr at the level ``-q`` / ``-v`` ask for."""
    logger = logging.getLogger(LOGGER)
    if _HANDLER not in logger.handlers:
        logger.addHandler(_HANDLER)
    logger.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose else logging.WARNING)
    if quiet:
        _quiet_libraries()


def _quiet_libraries() -> None:
    """Progress bars and warnings of the libraries quantcal drives, off for this process."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    disable_progress_bars()
    try:  # only the hub's data sets need it; a local-data install may lack it
        import datasets
    except ImportError:
        return
    datasets.disable_progress_bars()


def configure(ctx: click.Context) -> None:
    """Apply the ``-q`` / ``-v`` given so far (on the group or the command) to the output."""
    configure_output(bool(ctx.meta.get(_QUIET)), bool(ctx.meta.get(_VERBOSE)))


def _remember(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta[_QUIET if param.name == "quiet" else _VERBOSE] = True
        if ctx.meta.get(_QUIET) and ctx.meta.get(_VERBOSE):
            raise click.UsageError("-q/--quiet and -v/--verbose exclude each other", ctx)
        configure(ctx)
    return value


def verbosity_options(f):
    """``-q/--quiet`` and ``-v/--verbose`` (on the group and on every command)."""
    for opt in (click.option("-v", "--verbose", is_flag=True, expose_value=False,
                              callback=_remember,
                              help="Show more: debug messages and onnxruntime's own log."),
                click.option("-q", "--quiet", is_flag=True, expose_value=False,
                             callback=_remember,
                             help="Print results and errors only: no progress bars, no "
                             "notices.")):
        f = opt(f)
    return f


def shows_progress() -> bool:
    """False under ``-q``: progress bars stay off."""
    return not click.get_current_context().meta.get(_QUIET, False)
