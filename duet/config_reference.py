"""The configuration reference (docs/configuration.md), rendered from `service.settings.Settings`.

The table is generated, not written, so it cannot drift from the settings model: every field,
its environment variable(s), type, constraints, default and description come from the model's
own metadata, and a unit test fails when the checked-in page differs from what this renders.
Defaults are read from the field definitions, never from a `Settings()` instance, so the
output does not depend on the environment of whoever runs it.
"""

from __future__ import annotations

import json
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import AliasChoices, AliasPath
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

REGENERATE = "duet config-reference > docs/configuration.md"

_HEADER = """\
# Configuration reference

<!-- Generated from service/settings.py by `{regenerate}`: edit the settings model, not this file. -->

Every setting of `duet serve` and `duet worker` comes from one typed model,
`service.settings.Settings`, and can be set from the environment. Names are case-insensitive;
lists are written as JSON (`DUET_PRELOAD_MODELS='["minilm", "minilm-dual"]'`); booleans accept
`true`/`false`/`1`/`0`. Command-line options (`duet serve --port`, `--data-dir`, ...) override
the environment. An invalid value, or a combination the model refuses, stops the service at
start with a message naming the variable.

| variable | type | default | description |
|---|---|---|---|
"""


def env_names(name: str, field: FieldInfo, prefix: str) -> list[str]:
    """The environment variables that set `name`: the alias choices if it has any, else PREFIX + NAME.

    pydantic-settings reads an aliased field only from its aliases (the prefix is not added), so the
    reference must show them as written; choices that differ only in case name the same variable.
    """
    alias = field.validation_alias
    if alias is None:
        return [f"{prefix}{name}".upper()]
    choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
    names: list[str] = []
    for choice in choices:
        if isinstance(choice, AliasPath):  # nested paths are not environment variables
            continue
        if choice.upper() not in names:
            names.append(choice.upper())
    return names


def type_name(annotation: Any) -> str:
    """A short, readable name for a field's type (`int`, `str | None`, `"auto" | "cpu"`)."""
    if annotation is None or annotation is type(None):
        return "None"
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(value) for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(type_name(arg) for arg in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(annotation, "__name__", str(annotation))


def constraints(field: FieldInfo) -> str:
    """Bounds the model enforces (`> 0`, `1..65535`), so readers see them before the service refuses a value."""
    parts = []
    for item in field.metadata:
        for cls, symbol, attr in ((Gt, ">", "gt"), (Ge, ">=", "ge"), (Lt, "<", "lt"), (Le, "<=", "le")):
            if isinstance(item, cls):
                parts.append(f"{symbol} {getattr(item, attr)}")
        if isinstance(item, MinLen):
            parts.append(f"min length {item.min_length}")
        if isinstance(item, MaxLen):
            parts.append(f"max length {item.max_length}")
    return ", ".join(parts)


def format_default(field: FieldInfo) -> str | None:
    """The default as one would write it in the environment (JSON lists, lower-case booleans); None if unset."""
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return None
    else:
        value = field.default
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        text = str(value)
        return text if value.is_absolute() or text.startswith(".") else f"./{text}"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, list | tuple | dict):
        return json.dumps(value)
    return str(value)


def _cell(text: str, code: bool = False) -> str:
    """A Markdown table cell: pipes escaped (GitHub needs that even inside backticks), newlines folded."""
    text = " ".join(text.split()).replace("|", "\\|")
    if code and text:
        return f"`{text}`"
    return text


def _default_cell(field: FieldInfo) -> str:
    """A literal default in code font; `required` / `unset` in plain text, since they are not values to type."""
    default = format_default(field)
    if default is not None:
        return _cell(default, code=True)
    return "required" if field.is_required() else "unset"


def rows(settings_cls: type | None = None) -> list[tuple[str, str, str, str]]:
    """(variables, type, default, description) for every field of the settings model, in definition order."""
    if settings_cls is None:
        from service.settings import Settings

        settings_cls = Settings
    prefix = settings_cls.model_config.get("env_prefix", "")  # type: ignore[attr-defined]
    table = []
    for name, field in settings_cls.model_fields.items():  # type: ignore[attr-defined]
        variables = " / ".join(_cell(env, code=True) for env in env_names(name, field, prefix))
        kind = _cell(type_name(field.annotation), code=True)
        bounds = constraints(field)
        if bounds:
            kind += f" ({_cell(bounds)})"
        table.append((variables, kind, _default_cell(field), _cell(field.description or "")))
    return table


def render_markdown(settings_cls: type | None = None) -> str:
    """The whole docs/configuration.md page, ending in a newline."""
    body = "".join(f"| {' | '.join(row)} |\n" for row in rows(settings_cls))
    return _HEADER.format(regenerate=REGENERATE) + body
