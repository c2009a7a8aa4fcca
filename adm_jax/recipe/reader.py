"""Reading a config: the one accessor every layer above uses, and the error it raises.

Configs arrive as ``ml_collections.ConfigDict`` (the entry point), as plain dicts (configs
stored next to checkpoints, notebooks) or as objects built by hand; ``config_get`` reads all
three the same way, so "absent" and "empty" mean the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """A config field is unknown or has an impossible value; the message names the field."""


def config_get(section: Any, name: str, default: Any = None) -> Any:
    """``section.name`` of a ConfigDict, dict or plain object, else ``default`` (also for a
    missing ``section``)."""
    if section is None:
        return default
    if hasattr(section, "get"):
        return section.get(name, default)
    return getattr(section, name, default)


def config_text(section: Any, name: str, default: str = "") -> str:
    """A string field; None and missing read as ``default`` (stored configs lack new fields)."""
    value = config_get(section, name, default)
    return default if value is None else str(value)


def to_dict(section: Any) -> dict[str, Any]:
    """A section (ConfigDict, mapping or plain object) as a plain dict; None as {}."""
    if section is None:
        return {}
    if hasattr(section, "to_dict"):
        return dict(section.to_dict())
    if isinstance(section, Mapping):
        return dict(section)
    return dict(vars(section))
