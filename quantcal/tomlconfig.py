"""Defaults from ``quantcal.toml`` in the working directory.

Layout: top-level keys apply to every command that has an option of that name (typically
``model`` and ``run``); a table named after a command (``[calibrate]``, ``[export]``, ...)
applies to that command only and wins over top-level keys. Keys may use ``-`` or ``_``.
Command-line flags always win (the result is used as click's ``default_map``). A key that
no command knows is an error naming the key and the file, and so is a value of the wrong
type or out of range (checked against the click parameter, the way the flag would be):
``quantcal.toml: run = 5: expected a path (a string)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import click

from quantcal.errors import QuantcalError

import tomllib

CONFIG_NAME = "quantcal.toml"


def _key(name: str) -> str:
    return name.replace("-", "_")


def _toml(value: Any) -> str:
    """``value`` spelled as in the toml file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def _expected(param: click.Parameter) -> tuple[tuple[type, ...], str]:
    """The toml types one value of ``param`` may have, and how to say so (a quantcal
    parameter type says it in its ``expects``)."""
    kind = param.type
    if getattr(param, "is_flag", False) or isinstance(kind, click.types.BoolParamType):
        return (bool,), "true or false"
    if isinstance(kind, click.Path):
        return (str,), "a path (a string)"
    if isinstance(kind, click.Choice):
        return (str,), "one of " + ", ".join(f'"{c}"' for c in kind.choices)
    if isinstance(kind, (click.types.IntParamType,)) or kind.name == "integer":
        return (int,), "a whole number"
    if isinstance(kind, click.types.FloatParamType) or kind.name == "number":
        return (int, float), "a number"
    return (str,), getattr(kind, "expects", "a string")


def check_value(where: str, key: str, value: Any, param: click.Parameter) -> Any:
    """``value`` for ``param`` as click would take it from the command line, or a
    QuantcalError naming ``where`` (the file) and ``key``."""
    types, said = _expected(param)
    if param.multiple:
        said = f"a list, each item {said}"
    items = value if param.multiple else [value]
    if param.multiple and not isinstance(value, list):
        raise QuantcalError(f"{where}: {key} = {_toml(value)}: expected {said}")
    for item in items:
        if isinstance(item, bool) != (types == (bool,)) or not isinstance(item, types):
            raise QuantcalError(f"{where}: {key} = {_toml(value)}: expected {said}")
        try:
            param.type.convert(item, param, None)
        except click.BadParameter as exc:
            raise QuantcalError(f"{where}: {key} = {_toml(value)}: {exc.message}") from None
    return value


def load_defaults(path: Path, commands: Mapping[str, Sequence[click.Parameter]]
                  ) -> dict[str, dict[str, Any]]:
    """Read ``path`` into ``{command: {param: value}}`` for click's ``default_map``, every
    value checked against its click parameter.

    Args:
        path: the toml file; a missing file gives no defaults.
        commands: each command's click parameters (``command.params``).
    """
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise QuantcalError(f"{path.name} is not valid TOML ({exc}); fix or remove it"
                            ) from None
    where = path.name
    params = {c: {p.name: p for p in ps if p.name} for c, ps in commands.items()}
    top = {_key(k): v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    known_anywhere = set().union(*params.values()) if params else set()
    for key in top:
        if key not in known_anywhere:
            raise QuantcalError(
                f"{where}: unknown key {key!r}; top-level keys must be options of a command "
                f"(e.g. model, run) and tables must be one of [{'], ['.join(sorted(commands))}]"
            )
    defaults: dict[str, dict[str, Any]] = {}
    for command, known in params.items():
        merged = {k: check_value(where, k, v, known[k]) for k, v in top.items() if k in known}
        for raw, value in tables.get(command, {}).items():
            key = _key(raw)
            if key not in known:
                raise QuantcalError(
                    f"{where}: unknown key {raw!r} in [{command}]; known keys: "
                    f"{', '.join(sorted(known))}"
                )
            merged[key] = check_value(f"{where} [{command}]", raw, value, known[key])
        if merged:
            defaults[command] = merged
    for table in tables:
        if table not in commands:
            raise QuantcalError(
                f"{where}: unknown table [{table}]; use one of [{'], ['.join(sorted(commands))}]"
            )
    return defaults
