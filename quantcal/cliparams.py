"""Click parameter types of the ``quantcal`` command line: each checks one option's value
before any work and fails with a message that click prefixes with the flag's name (and
:mod:`quantcal.tomlconfig` with the file and key, for values from ``quantcal.toml``).

Counts and sizes are at least 1, budgets finite and positive (``--target-bits`` within the
range any format reaches), formats, tasks, devices and ``--force`` rules are parsed here so
a typo fails in a second, not after a calibration. Also the ``--run`` option every command
shares. Reads and writes nothing.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import click

from quantcal.errors import QuantcalError
from quantcal.formats import FP16, INT4_GROUP_SIZES, Int4, parse_format, parse_formats
from quantcal.rundir import DEFAULT_RUN_DIR

# what any format can store per weight: symmetric int4 with the largest group, up to fp16
MIN_BITS = min(Int4(g, symmetric=True).bits_per_weight(1, g) for g in INT4_GROUP_SIZES)
MAX_BITS = float(FP16().weight_bits)
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class Count(click.ParamType):
    """A whole number of at least ``minimum`` (samples, tokens, windows, documents)."""

    name = "integer"

    def __init__(self, minimum: int = 1):
        self.minimum = minimum

    def convert(self, value, param, ctx):
        if isinstance(value, bool) or isinstance(value, float):
            self.fail(f"expected a whole number, got {value!r}", param, ctx)
        number = click.INT.convert(value, param, ctx)
        if number < self.minimum:
            self.fail(f"must be at least {self.minimum}, got {number}", param, ctx)
        return number


class Positive(click.ParamType):
    """A finite number above 0 (or 0 too, with ``zero``), optionally within
    ``[low, high]`` (named ``what``)."""

    name = "number"

    def __init__(self, low: float | None = None, high: float | None = None, what: str = "",
                 zero: bool = False):
        self.low, self.high, self.what, self.zero = low, high, what, zero

    def convert(self, value, param, ctx):
        if isinstance(value, bool):
            self.fail(f"expected a number, got {value!r}", param, ctx)
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number) or number < 0 or (number == 0 and not self.zero):
            least = "0 or above" if self.zero else "above 0"
            self.fail(f"must be a finite number {least}, got {number:g}", param, ctx)
        low, high = self.low or 0.0, self.high or math.inf
        if not low <= number <= high:
            self.fail(f"{number:g} is outside the feasible range {low:g} to {high:g} "
                      f"{self.what}".rstrip(), param, ctx)
        return number


class Size(click.ParamType):
    """A size above 0 such as ``90MB``, ``1.2GB`` or ``500MiB``; kept as written."""

    name = "size"
    expects = 'a size such as "90MB"'

    def convert(self, value, param, ctx):
        from quantcal.calibrate.plans import parse_size

        if not isinstance(value, str):
            self.fail(f"expected a size such as \"90MB\", got {value!r}", param, ctx)
        try:
            nbytes = parse_size(value)
        except QuantcalError:
            self.fail(f"{value!r} is not a size; write one such as 90MB, 1.2GB or 500MiB",
                      param, ctx)
        if nbytes <= 0:
            self.fail(f"{value!r} is not above 0 bytes; write a size such as 90MB", param, ctx)
        return value


class _CommaList(click.ParamType):
    """A comma-separated string parsed to a tuple by :meth:`parse` (a tuple, e.g. a default
    already parsed, passes as it is)."""

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        if not isinstance(value, str):
            self.fail(f"expected {self.expects}, got {value!r}", param, ctx)
        return self.parse(value, param, ctx)


class Formats(_CommaList):
    """A comma-separated list of formats, e.g. ``int8,int4-g128``; parsed to a tuple."""

    name = "formats"
    expects = 'a comma-separated string such as "int8,int4-g128"'

    def parse(self, value, param, ctx):
        try:
            return parse_formats(value)
        except QuantcalError as exc:
            self.fail(str(exc), param, ctx)


class ForceRule(click.ParamType):
    """``PATTERN=FORMAT`` with a known format; kept as written."""

    name = "pattern=format"
    expects = 'a string PATTERN=FORMAT such as "*.down_proj=int8"'

    def convert(self, value, param, ctx):
        pattern, sep, fmt = str(value).rpartition("=")
        if not isinstance(value, str) or not sep or not pattern:
            self.fail(f"{value!r}: write PATTERN=FORMAT, e.g. '*.down_proj=int8'", param, ctx)
        try:
            parse_format(fmt)
        except QuantcalError as exc:
            self.fail(str(exc), param, ctx)
        return value


class Device(click.ParamType):
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""

    name = "device"
    expects = 'one of "auto", "cpu", "cuda", "cuda:N"'

    def convert(self, value, param, ctx):
        if not isinstance(value, str) or not _DEVICE.match(value):
            self.fail(f"unknown device {value!r}; use auto, cpu, cuda or cuda:N", param, ctx)
        return value


class Tasks(_CommaList):
    """A comma-separated list of known evaluation tasks; parsed to a tuple of names."""

    name = "tasks"
    expects = 'a comma-separated string such as "hellaswag,wikitext2"'

    def parse(self, value, param, ctx):
        from quantcal.evaluate.tasks import TASKS

        known = ", ".join(TASKS)
        names = [t.strip() for t in value.split(",") if t.strip()]
        if not names:
            self.fail(f"no task named; choose from {known}", param, ctx)
        unknown = [t for t in names if t not in TASKS]
        if unknown:
            self.fail(f"unknown task {unknown[0]!r}; choose from {known}", param, ctx)
        if len(set(names)) != len(names):
            self.fail(f"{value!r} names a task twice", param, ctx)
        return tuple(names)


COUNT = Count(1)
TARGET_BITS = Positive(MIN_BITS, MAX_BITS, "bits per weight (int4-g128-sym to fp16)")
POSITIVE = Positive()
PROBABILITY = Positive(high=1.0, what="(a probability)")
NON_NEGATIVE = Positive(zero=True)


def run_option(f):
    """``--run DIR``: the run directory a command reads and writes."""
    return click.option("--run", "run", type=click.Path(file_okay=False, path_type=Path),
                        default=DEFAULT_RUN_DIR, show_default=True,
                        help=f"Run directory this stage reads and writes (default "
                        f"./{DEFAULT_RUN_DIR}).")(f)


def device_option(help: str = "auto, cpu, cuda or cuda:N."):
    """``--device`` (default ``auto``): where a torch model runs."""
    return click.option("--device", type=Device(), default="auto", show_default=True, help=help)


def dtype_option(help: str | None = None):
    """``--dtype auto|float32|float16|bfloat16`` (default ``auto``)."""
    return click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
                        default="auto", show_default=True, help=help)
