"""pydantic's validation errors as the one line a bad sweep file gets: the key, the value, what is wrong."""

from __future__ import annotations

import re

from pydantic import BaseModel, ValidationError


def first_error(exc: ValidationError, document: type[BaseModel]) -> str:
    """The first of `exc`'s errors, for a model `document` of sections (each a model of keys)."""
    error = exc.errors(include_url=False)[0]
    location = ".".join(str(part) for part in error["loc"])
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        return _unknown_key(location, document)
    message = str(error["msg"]).removeprefix("Value error, ")
    message = re.sub(r" or instance of \w+", "", message)
    if message.startswith(tuple(f"{section}." for section in document.model_fields)):
        return message  # our own validators already name the key and the value
    if error["type"] == "value_error":
        return f"{location} {message}"
    return f"{location} = {value!r}: {message[0].lower() + message[1:]}"


def _unknown_key(location: str, document: type[BaseModel]) -> str:
    section_name = location.rsplit(".", 1)[0] if "." in location else ""
    model = document
    if section_name:
        section = document.model_fields[section_name].annotation
        assert isinstance(section, type) and issubclass(section, BaseModel), section
        model = section
    where = f" in [{section_name}]" if section_name else ""
    return f"unknown key {location!r}; known keys{where}: {', '.join(model.model_fields)}"
