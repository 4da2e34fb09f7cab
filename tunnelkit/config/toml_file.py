"""``--config FILE``: the settings from a TOML file.

The file's top-level keys are the process-wide settings and each
``[[listener]]`` table is one listener; every key is a long flag's name
(``connect-timeout = 5``, ``to = ["10.0.0.1:80", "10.0.0.2:80"]``), so
``docs/config.md`` needs no second vocabulary. A repeatable key takes a
list or a single string; a switch (``no-half-close``) takes a boolean.
Unknown keys are errors, with a guess when it is a near miss
(``connect_timeout``). Reading uses the standard library's ``tomllib``.
"""

from __future__ import annotations

import tomllib
from typing import Any

from tunnelkit.config.keys import KEYS, BadValue
from tunnelkit.config.model import (
    BadItem,
    ConfigError,
    Path,
    Problem,
    Settings,
    build_settings,
    check_value,
)

#: The name of the array of listener tables.
LISTENER = "listener"


def load(path: str, endpoint_types: frozenset[str]) -> Settings:
    """The settings in the TOML file at ``path``; :class:`ConfigError` names every problem."""
    return from_document(read(path), path, endpoint_types)


def read(path: str) -> dict[str, Any]:
    """The TOML document at ``path``, parsed but not checked."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError([Problem((), f"cannot read: {e.strerror or e}")], path) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([Problem((), f"not valid TOML: {e}")], path) from None


def listener_tables(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The document's ``[[listener]]`` tables, as written (none if it has no valid array)."""
    tables = document.get(LISTENER, [])
    if isinstance(tables, list) and all(isinstance(t, dict) for t in tables):
        return tables
    return []


def from_document(
    document: dict[str, Any], source: str, endpoint_types: frozenset[str]
) -> Settings:
    """The settings in a parsed TOML ``document`` (from ``source``, for messages)."""
    problems: list[Problem] = []
    tables = listener_tables(document)
    if not tables and LISTENER in document:
        problems.append(Problem((LISTENER,), "must be an array of tables: write [[listener]]"))
    process = _typed({k: v for k, v in document.items() if k != LISTENER}, (), problems)
    listeners = [_typed(table, (LISTENER, i), problems) for i, table in enumerate(tables)]
    try:
        settings = build_settings(process, listeners, source=source, endpoint_types=endpoint_types)
    except ConfigError as e:
        raise ConfigError(problems + e.problems, source) from None
    if problems:
        raise ConfigError(problems, source)
    return settings


def _typed(table: dict[str, Any], path: Path, problems: list[Problem]) -> dict[str, Any]:
    """``table``'s values checked by their keys' kinds; bad ones become problems and are left out.

    Unknown keys are kept, for :func:`build_settings` to name them (with a
    guess) together with the keys given in the wrong scope.
    """
    typed: dict[str, Any] = {}
    for name, value in table.items():
        key = KEYS.get(name)
        if key is None:
            typed[name] = value
            continue
        try:
            typed[name] = check_value(key, value, from_text=False)
        except BadItem as e:
            problems.append(Problem((*path, name, e.index), str(e)))
        except BadValue as e:
            problems.append(Problem((*path, name), str(e)))
    return typed
