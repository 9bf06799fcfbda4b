"""The oldest releases of quantcal's key dependencies that do what the code asks of them.

``install_requires`` in ``setup.cfg`` carries the same floors (a test keeps them equal);
:func:`check_versions` refuses, before a command starts, an environment that has an older
release installed anyway (``pip install --no-deps``, a pinned image), in one line that says
what to install, instead of a wrong result or an obscure failure deep in a stage. Reads
installed package metadata only (no import of the packages themselves); writes nothing.
"""

from __future__ import annotations

import re
from importlib import metadata
from typing import Callable, NamedTuple

from quantcal.errors import QuantcalError


class Floor(NamedTuple):
    """The oldest usable release of one requirement and why nothing older will do."""

    requirement: str  # the name setup.cfg installs
    distributions: tuple[str, ...]  # the distributions that provide the same module
    version: str
    why: str


FLOORS = (
    # transformers 4.56 added from_pretrained(dtype=); 5.0 moved rope settings into
    # config.rope_parameters, which the family checks and the exporter read (on 4.x a
    # 'dynamic' rope would pass the check unseen)
    Floor("transformers", ("transformers",), "5.0",
          "from_pretrained(dtype=) and config.rope_parameters"),
    # 1.22.0 added the CUDA kernel of 8-bit MatMulNBits (onnxruntime#24509), 1.23.0 the
    # CUDA GatherBlockQuantized (#25575); its 4-bit packed tables (a quantized embedding, a
    # tied 4-bit head) index correctly on CUDA from 1.24.1 (#26484)
    Floor("onnxruntime-gpu", ("onnxruntime-gpu", "onnxruntime"), "1.24.1",
          "CUDA kernels for 8-bit MatMulNBits and 4-bit GatherBlockQuantized"),
)


def release(version: str) -> tuple[int, ...]:
    """The leading release numbers of a version string: ``"1.24.1rc2"`` -> ``(1, 24, 1)``."""
    match = re.match(r"^\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(p) for p in match.group(1).split(".")) if match else ()


def installed(distribution: str) -> str | None:
    """The installed version of ``distribution``, or None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def check_versions(lookup: Callable[[str], str | None] | None = None) -> None:
    """Refuse an installed release older than its floor.

    A requirement none of whose distributions is installed is left to the import that needs
    it; where several are (``onnxruntime`` beside ``onnxruntime-gpu``), the newest counts.
    ``lookup``: a distribution's installed version (default :func:`installed`).

    Raises:
        QuantcalError: one line naming the package, the floor, why, and the pip command.
    """
    for floor in FLOORS:
        found = [v for v in map(lookup or installed, floor.distributions) if v]
        if not found:
            continue
        have = max(found, key=release)
        if release(have) < release(floor.version):
            raise QuantcalError(
                f"quantcal needs {floor.requirement} >= {floor.version} ({floor.why}); this "
                f"environment has {have}: pip install -U '{floor.requirement}>={floor.version}'")
