"""`slap config`: every setting of the resolved config with its value, default and description.

The descriptions are the config model's own (``slap_ray.config``, a docstring under each
field), so a setting is explained in one place.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from slap_ray.config import SlapConfig


def _is_section(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _list_item_model(annotation: object) -> type[BaseModel] | None:
    """The model of a ``list[Model] | None`` field (``sweep.arms``), if it is one."""
    for arg in getattr(annotation, "__args__", ()):
        if _is_section(arg):
            return arg
    return None


def _plain(value: object) -> object:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):  # a list item's unset options (an arm's) are left out
        return {k: _plain(v) for k, v in value.items() if v is not None}
    return value


def _text(value: object) -> str:
    return json.dumps(_plain(value))


def settings(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """(dotted key, field) for every leaf setting under ``model``; the fields of a list of
    models (the sweep's arms) appear as ``sweep.arms[].<key>``."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        if _is_section(field.annotation):
            yield from settings(field.annotation, f"{key}.")
            continue
        yield key, field
        item = _list_item_model(field.annotation)
        if item is not None:
            yield from settings(item, f"{key}[].")


def _value_at(tree: dict, key: str) -> tuple[bool, object]:
    node: object = tree
    for part in key.split("."):
        if "[]" in part or not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def describe(config: SlapConfig) -> list[str]:
    """Lines of ``key: value`` (and its default where it differs), then the description."""
    tree = config.model_dump(mode="json", by_alias=True)
    lines = []
    for key, field in settings(SlapConfig):
        has_value, value = _value_at(tree, key)
        default = (
            "none: required"
            if field.is_required()
            else _text(field.get_default(call_default_factory=True))
        )
        if not has_value:
            head = f"{key}  (per item; default {default})"
        elif _text(value) == default:
            head = f"{key}: {_text(value)}"
        else:
            head = f"{key}: {_text(value)}  (default {default})"
        lines.append(head)
        lines.extend(textwrap.wrap(field.description or "", 96, initial_indent="    ",
                                   subsequent_indent="    "))  # fmt: skip
    return lines
