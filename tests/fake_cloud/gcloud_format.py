"""gcloud's ``--format`` for the fake: ``yaml`` (describe's default), ``json`` and
``value(KEY,...)``, where KEY is a dotted path with ``[]`` to flatten a list
(``networkEndpoints[].ipAddress``). As gcloud prints them: value() joins the keys with a tab
and a list's items with ``;``, prints booleans as True/False and a missing key as nothing."""

import json
import re

__all__ = ["render"]


def render(resource: dict, fmt: str) -> str:
    fmt = fmt.strip()
    if fmt in ("", "yaml", "default"):
        return _yaml(resource, 0)
    if fmt == "json":
        return json.dumps(resource, indent=2, sort_keys=True) + "\n"
    match = re.fullmatch(r"value\((.*)\)", fmt)
    if not match:
        raise ValueError(f"fake gcloud: unsupported --format={fmt!r} (yaml, json, value(...))")
    keys = [k.strip() for k in match.group(1).split(",") if k.strip()]
    return "\t".join(_scalar(_lookup(resource, key)) for key in keys) + "\n"


def _lookup(value, key: str):
    for part in key.split("."):
        flatten = part.endswith("[]")
        part = part[:-2] if flatten else part
        if isinstance(value, list):
            value = [item.get(part) if isinstance(item, dict) else None for item in value]
        elif isinstance(value, dict):
            value = value.get(part)
        else:
            return None
        if flatten and value is not None and not isinstance(value, list):
            value = [value]
    return value


def _scalar(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, list):
        return ";".join(_scalar(v) for v in value if v is not None)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _yaml(value, indent: int) -> str:
    pad = " " * indent
    lines = []
    if isinstance(value, dict):
        for key in sorted(value):
            item = value[key]
            if isinstance(item, dict) and item:
                lines.append(f"{pad}{key}:\n{_yaml(item, indent + 2)}")
            elif isinstance(item, list) and item:
                lines.append(f"{pad}{key}:\n{_yaml(item, indent)}")
            else:
                lines.append(f"{pad}{key}: {_yaml_scalar(item)}\n")
    else:
        for item in value:
            body = _yaml(item, indent + 2) if isinstance(item, (dict, list)) else None
            if body is None:
                lines.append(f"{pad}- {_yaml_scalar(item)}\n")
            else:
                lines.append(f"{pad}- {body.lstrip()}")
    return "".join(lines)


def _yaml_scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None or value == {} or value == []:
        return "{}" if value == {} else ("[]" if value == [] else "null")
    if isinstance(value, (int, float)):
        return str(value)
    text = str(value)
    return f"'{text}'" if re.search(r"[:#\[\]{}]|^\s|\s$|^$", text) else text
