"""The error every control raises, layer keys, and the field type check the control dataclasses share.

Design choices:
- Keys are a layer index or "all"; a layer's own entry overrides the "all" entry field by field (routing) or as a
  whole (latent). Every `None` field means "as the model is".
- JSON keys arrive as strings ("2"); they become ints here, so a control reads the same whether built in Python or
  loaded from JSON. Only whole numbers become keys: 1.9, "1.9" or True are refused, never rounded to a layer.
- JSON can put any type anywhere, so every level of a loaded control checks it got a mapping (`_need_mapping`) and
  says where it did not, instead of failing later with an AttributeError.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Mapping
from typing import Any, Literal

LayerKey = int | Literal["all"]


class ControlError(ValueError):
    """A control no model of this config could obey; the message names the layer and the field."""


def _need_type(control: object, name: str, kind: type | tuple[type, ...]) -> bool:
    """Raise unless the field is None or of `kind` (bool is not a number here); True when it is set."""
    value = getattr(control, name)
    if value is None:
        return False
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        wanted = kind.__name__ if isinstance(kind, type) else "a number"
        raise ControlError(f"{type(control).__name__}.{name} must be {wanted}, got {value!r}")
    return True


def _integral(value: Any) -> int | None:
    """`value` as an int when it is one: an int (bool is not) or a string of digits as JSON keys arrive ("3")."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value):
        return int(value)
    return None  # 1.9, "1.9", True, None, ...: never rounded to a layer or expert


def _layer_key(key: Any, where: str = "") -> LayerKey:
    """An int layer or "all"; `where` ("routing", "fp8", ...) starts the message when the key is neither."""
    if isinstance(key, str) and key == "all":
        return "all"
    layer = _integral(key)
    if layer is None:
        raise ControlError(f"{where + ': ' if where else ''}layer key must be an int or 'all' "
                           f"(in JSON a string of digits such as \"3\"), got {key!r}")
    return layer


def _need_mapping(value: Any, where: str, what: str) -> Mapping[Any, Any]:
    """Raise naming `where` unless `value` is a mapping (a JSON object); JSON can put a list or a number anywhere."""
    if not isinstance(value, Mapping):
        raise ControlError(f"{where} must be {what}, got {type(value).__name__} {_short(value)}")
    return value


def _from_fields(cls: Any, d: Any, where: str, what: str) -> Any:
    """A control dataclass `cls` built from JSON's object of its fields: the object, the field names and the values
    (the class's own checks) are validated, each message starting with `where` (e.g. "routing[2]")."""
    d = _need_mapping(d, where, what)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known, key=str)
    if unknown:
        raise ControlError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**d)
    except ControlError as e:
        raise ControlError(f"{where}: {e}") from None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
