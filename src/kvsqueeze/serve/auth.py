"""API keys: who is asking, and so who owns a context.

A context belongs to the key that created it. The index stores a digest of the key, never the key. With no
keys configured the server is open and every context belongs to the same anonymous owner.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from .errors import Unauthorized

ANONYMOUS = "anonymous"


def keys_from(cli_keys: list[str] | None, environ: dict | None = None) -> list[str]:
    """The keys given with --api-key and in KVSQUEEZE_API_KEYS (comma-separated)."""
    environ = os.environ if environ is None else environ
    keys = list(cli_keys or []) + environ.get("KVSQUEEZE_API_KEYS", "").split(",")
    return [key.strip() for key in keys if key.strip()]


class Auth:
    def __init__(self, keys: list[str]):
        self._keys = [key.encode() for key in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def owner(self, authorization: str | None) -> str:
        """The owner for an `Authorization` header value; raises Unauthorized when keys are set and it holds none of them."""
        if not self.enabled:
            return ANONYMOUS
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key")
        given = token.strip().encode()
        # compare with every key, in constant time each, so timing tells nothing about which one nearly matched
        matches = [hmac.compare_digest(given, key) for key in self._keys]
        if not any(matches):
            raise Unauthorized("invalid API key", code="invalid_api_key")
        return "key-" + hashlib.sha256(given).hexdigest()[:32]
