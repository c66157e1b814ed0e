"""Passwords in URIs masked: every line and file we write shows `scheme://user:***@`, never the password."""

from __future__ import annotations

import re

# scheme://user:password@host. SQLAlchemy takes the password to be anything (even '/' and spaces) up to an '@';
# we mask up to the last '@' of the URI, so a password holding '@' is not half shown either. A web URI keeps its
# path: only what precedes the first '/' can be credentials there.
_SCHEME_START = r"(?<![A-Za-z0-9+.-])"
_USER = r"[^:/@\s'\"]*:"
_PASSWORD_IN_DATABASE_URI = re.compile(
    _SCHEME_START + r"(?!(?i:https?)://)(?P<head>[A-Za-z][A-Za-z0-9+.-]*://" + _USER + r")"
    r".*?@(?=[^@\s'\"]*(?:[\s'\"]|$))"
)
_PASSWORD_IN_WEB_URI = re.compile(_SCHEME_START + r"(?P<head>(?i:https?)://" + _USER + r")[^/@\s'\"]*@")
# ...?password=pw&...: SQLAlchemy hands a URL's query to the driver, and libpq, psycopg and PyMySQL all take the
# password there too (password, passwd; PGPASSWORD-style 'pass' is not a key they read). Up to '&', '#', a space
# or a quote; a '@' after it is no end, as a password may hold one.
_PASSWORD_IN_QUERY = re.compile(r"(?P<head>://[^\s'\"?]*\?(?:[^\s'\"#]*?&)?(?i:password|passwd)=)[^&#\s'\"]*")


def mask_password(text: str) -> str:
    """Every `scheme://user:password@` in `text` shown as `scheme://user:***@`, and every `?password=pw` in a
    URI's query as `?password=***`: for every line and file we write."""
    masked = _PASSWORD_IN_DATABASE_URI.sub(r"\g<head>***@", text)
    masked = _PASSWORD_IN_WEB_URI.sub(r"\g<head>***@", masked)
    return _PASSWORD_IN_QUERY.sub(r"\g<head>***", masked)
