"""The error every control raises, layer keys, and the field type check the control dataclasses share.

Design choices:
- Keys are a layer index or "all"; a layer's own entry overrides the "all" entry field by field (routing) or as a
  whole (latent). Every `None` field means "as the model is".
- JSON keys arrive as strings ("2"); they become ints here, so a control reads the same whether built in Python or
  loaded from JSON.
"""

from __future__ import annotations

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


def _layer_key(key: Any) -> LayerKey:
    if key == "all":
        return "all"
    if isinstance(key, bool):
        raise ControlError(f"layer key must be an int or 'all', got {key!r}")
    try:
        return int(key)
    except (TypeError, ValueError):
        raise ControlError(f"layer key must be an int or 'all', got {key!r}") from None
