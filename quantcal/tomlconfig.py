"""Defaults from ``quantcal.toml`` in the working directory.

Layout: top-level keys apply to every command that has an option of that name (typically
``model`` and ``run``); a table named after a command (``[calibrate]``, ``[export]``, ...)
applies to that command only and wins over top-level keys. Keys may use ``-`` or ``_``.
Command-line flags always win (the result is used as click's ``default_map``). A key that
no command knows is an error naming the key and the file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping

from quantcal.errors import QuantcalError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_NAME = "quantcal.toml"


def _key(name: str) -> str:
    return name.replace("-", "_")


def load_defaults(path: Path, commands: Mapping[str, set[str]]) -> dict[str, dict[str, Any]]:
    """Read ``path`` into ``{command: {param: value}}`` for click's ``default_map``.

    Args:
        path: the toml file; a missing file gives no defaults.
        commands: each command's parameter names (click's ``param.name``).
    """
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise QuantcalError(f"{path} is not valid TOML ({exc}); fix or remove it") from None
    top = {_key(k): v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    known_anywhere = set().union(*commands.values()) if commands else set()
    for key in top:
        if key not in known_anywhere:
            raise QuantcalError(
                f"{path}: unknown key {key!r}; top-level keys must be options of a command "
                f"(e.g. model, run) and tables must be one of [{'], ['.join(sorted(commands))}]"
            )
    defaults: dict[str, dict[str, Any]] = {}
    for command, params in commands.items():
        merged = {k: v for k, v in top.items() if k in params}
        for raw, value in tables.get(command, {}).items():
            key = _key(raw)
            if key not in params:
                raise QuantcalError(
                    f"{path}: unknown key {raw!r} in [{command}]; known keys: "
                    f"{', '.join(sorted(params))}"
                )
            merged[key] = value
        if merged:
            defaults[command] = merged
    for table in tables:
        if table not in commands:
            raise QuantcalError(
                f"{path}: unknown table [{table}]; use one of [{'], ['.join(sorted(commands))}]"
            )
    return defaults
