"""Sweep files as TOML text: `--set section.key=value` read as one TOML value (also how an MLflow param, always a
string, is read back as the number or name it was), and a resolved configuration written out."""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from mnist_sweep.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """`section.key=value` with exactly one TOML value; a bare word that is not TOML is taken as a string."""
    key, sep, raw = assignment.partition("=")
    parts = [p.strip() for p in key.strip().split(".")]
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set takes section.key=value, got {assignment!r}")
    raw = raw.strip()
    try:
        document = tomllib.loads(f"value = {raw}")
    except RecursionError:
        raise ConfigError(f"--set {key.strip()}: the value is nested too deeply, got {raw[:20]!r}...") from None
    except ValueError as exc:  # TOMLDecodeError, or an integer of over 4300 digits
        if not _starts_like_toml(raw):
            return parts, raw
        raise ConfigError(
            f"--set {key.strip()}={raw!r} is not one TOML value ({exc}); a string with spaces or brackets "
            f"is quoted: --set '{key.strip()}=\"...\"'"
        ) from None
    if list(document) != ["value"]:  # a newline and more assignments: each is its own --set
        raise ConfigError(f"--set {key.strip()}={raw!r} holds more than one value; give each key its own --set")
    return parts, document["value"]


def _starts_like_toml(raw: str) -> bool:
    """A value that opens as a TOML string, array, table or number, or holds another assignment: one that
    fails to parse is a typo, not a bare word."""
    opens = raw[:1] in ('"', "'", "[", "{", "+", "-") or raw[:1].isdigit()
    return opens or "\n" in raw or re.search(r"\s=|=\s", raw) is not None


def apply_overrides(document: dict[str, Any], assignments: Sequence[str]) -> dict[str, Any]:
    """A copy of `document` with each `section.key=value` assignment applied."""
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in document.items()}
    for assignment in assignments:
        parts, value = parse_override(assignment)
        node = merged
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {assignment!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return merged


def toml_string(value: str) -> str:
    """`value` as a TOML basic string, quoted and escaped: for sweep files written and `--set` values."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if value is None:
        raise ConfigError("cannot write None to TOML")
    raise ConfigError(f"cannot write {type(value).__name__} to TOML")


def dumps_toml(document: Mapping[str, Mapping[str, Any]]) -> str:
    """Sections of scalars, lists and inline tables: all a sweep file holds."""
    blocks = []
    for section, values in document.items():
        lines = [f"[{section}]"] + [f"{key} = {_toml_value(v)}" for key, v in values.items()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def typed_value(text: str) -> Any:
    """A string (an MLflow param) back as the TOML value it spells: the number or name it was logged as."""
    return parse_override(f"value.value={text}")[1]
