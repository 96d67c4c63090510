"""The one token check of the HTTP listener: /metrics and the status page accept the same [http] token."""

from __future__ import annotations

import base64
import binascii
import hmac


def authorized(header: str | None, token: str | None, *, basic: bool = False) -> bool:
    """Whether an Authorization header carries the token: as a bearer token, or (`basic`) as a Basic password.

    No token configured: everyone is. Compared in constant time, so the answer's timing does not leak the token.
    """
    if token is None:
        return True
    if not header:
        return False
    scheme, _, credentials = header.strip().partition(" ")
    expected = token.encode()
    if scheme.lower() == "bearer":
        return hmac.compare_digest(credentials.strip().encode(), expected)
    if basic and scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        _user, sep, password = decoded.partition(b":")
        return bool(sep) and hmac.compare_digest(password, expected)
    return False
