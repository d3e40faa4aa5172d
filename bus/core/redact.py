"""Keeping secrets out of messages: passwords in URLs, whatever their characters."""

from __future__ import annotations

import re

HIDDEN = "***"
# scheme://user:password@host... (the password may hold '/', '#', '?' or '@'; the host part
# after the last '@' of the authority never does).
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s'\"]*)@")
_QUERY_SECRET = re.compile(r"(?i)([?&](?:password|pass|secret|token)=)[^&#\s'\"]*")


def redact_url(url: str) -> str:
    """``url`` with the password of its user info, and password-like query values, hidden."""
    scheme, sep, rest = url.partition("://")
    if sep:
        at = rest.rfind("@")
        if at >= 0 and ":" in rest[:at]:
            user = rest[:at].split(":", 1)[0]
            rest = f"{user}:{HIDDEN}@{rest[at + 1 :]}"
        url = f"{scheme}{sep}{rest}"
    return _QUERY_SECRET.sub(rf"\1{HIDDEN}", url)


def redact_text(text: str) -> str:
    """``text`` with the password of every URL in it hidden."""

    def hide(match: re.Match[str]) -> str:
        userinfo = match.group("userinfo")
        if ":" not in userinfo:
            return match.group(0)
        return f"{match.group('scheme')}{userinfo.split(':', 1)[0]}:{HIDDEN}@"

    return _QUERY_SECRET.sub(rf"\1{HIDDEN}", _URL.sub(hide, text))
