"""Credentials out of anything printed: the password of every URL (`scheme://user:pass@host`)
and secret-looking query parameters (`?password=...`) become `***`. Used by `check-config` for
every URL setting (app.config.URL_VARIABLES) and by the log formatters for every line, so an
error that quotes a URL (a driver, an HTTP client) prints no secret either."""

from __future__ import annotations

import re

MASK = "***"
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s\"'<>]*):[^@\s\"'<>]*@")
_QUERY = re.compile(
    r"(?P<head>[?&](?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|sslpassword)=)"
    r"[^&#\s\"'<>]+",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with every URL password and secret query value masked."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(rf"\g<head>:{MASK}@", text)
    return _QUERY.sub(rf"\g<head>{MASK}", text)
