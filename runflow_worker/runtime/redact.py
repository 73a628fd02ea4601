"""Secret redaction for log lines, shared by the worker's and the ComfyUI child's logging.

It lives in ``runtime`` (which the worker may import) so that both processes scrub with
the same rules (SPEC §8: secrets never appear in logs): presigned URL queries, URL
credentials and ``whsec_`` secrets are replaced by ``[redacted]``.
"""

from __future__ import annotations

import re
from typing import Any

_URL_QUERY = re.compile(r"(?P<base>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#\"'<>]+)\?[^\s\"'<>]*")
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^\s/@\"'<>]+@")
_WEBHOOK_SECRET = re.compile(r"whsec_[A-Za-z0-9+/=_-]+")
REDACTED = "[redacted]"


def redact(text: str) -> str:
    """``text`` with URL queries (presigned signatures), URL credentials and secrets removed."""
    text = _WEBHOOK_SECRET.sub(REDACTED, text)
    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    return _URL_QUERY.sub(lambda m: f"{m.group('base')}?{REDACTED}", text)


def scrub(value: Any) -> Any:
    """``value`` with ``redact`` applied to every string in it (dicts, lists, tuples)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    return value
