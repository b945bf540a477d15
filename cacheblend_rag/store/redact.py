"""Store URLs made safe to show: the one redaction every error, log line and repr that shows a URL goes through.

A leaf module (it imports nothing of the store), so every tier can use it without an import cycle.
"""

from __future__ import annotations

import re

_SECRET_NAME = re.compile(r"pass|secret|token|auth|credential", re.IGNORECASE)
_QUERY_ITEM = re.compile(r"([?&;])([^=&;#]*)=([^&;#]*)")


def redact_url(url: str) -> str:
    """``url`` safe to show (errors, logs, reprs, traces): the password of ``scheme://user:PASSWORD@host`` and
    the values of query options that name a secret (``password=``, ``ssl_password=``, ``token=``, ...) become
    ``***``. The user, host, port, database and other options are kept."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _QUERY_ITEM.sub(_redact_item, url)
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    head, tail = rest[:cut], rest[cut:]
    userinfo, at, host = head.rpartition("@")  # the last "@": a password may hold an unescaped "@" or "/"
    if at and ":" in userinfo:
        head = f"{userinfo.split(':', 1)[0]}:***@{host}"
    return f"{scheme}://{head}{_QUERY_ITEM.sub(_redact_item, tail)}"


def _redact_item(match: re.Match) -> str:
    return f"{match[1]}{match[2]}=***" if _SECRET_NAME.search(match[2]) else match[0]


def redact_secrets(value):
    """``value`` with every URL in it (a string, or lists, tuples and dicts of them, as in engine arguments)
    passed through ``redact_url``, and the values of dict keys that name a secret replaced by ``***``."""
    if isinstance(value, str):
        return redact_url(value) if "://" in value or "=" in value else value
    if isinstance(value, dict):
        return {
            k: "***" if isinstance(k, str) and _SECRET_NAME.search(k) else redact_secrets(v) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact_secrets(v) for v in value)
    return value
