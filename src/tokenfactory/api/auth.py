"""API keys and tenants.

``--api-key KEY[:TENANT]`` (repeatable) maps each key to a tenant; the tenant becomes the
request's ``cache_salt`` so one tenant's prompts can never hit another's KV pages. Keys are
compared in constant time (``hmac.compare_digest`` against every configured key, no early exit)
and are never logged; only tenant names appear in logs.
"""
from __future__ import annotations

import hmac

from starlette.requests import Request

from tokenfactory.api.errors import APIError


def parse_api_key(spec: str) -> tuple[str, str]:
    """``KEY[:TENANT]`` -> (key, tenant). Without a tenant, each key is its own tenant."""
    key, sep, tenant = spec.partition(":")
    if not key:
        raise ValueError("empty API key")
    if not sep or not tenant:
        tenant = "key-" + hmac.new(b"tokenfactory-tenant", key.encode(), "sha256").hexdigest()[:12]
    return key, tenant


class Authenticator:
    def __init__(self, api_keys: dict[str, str] | None):
        # Encoded once; compare_digest needs equal types.
        self._keys = [(k.encode(), t) for k, t in (api_keys or {}).items()]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def tenant_for(self, request: Request) -> str | None:
        """The caller's tenant (None when auth is off). Raises 401 without a valid key."""
        if not self._keys:
            return None
        presented = request.headers.get("x-api-key")
        if presented is None:
            auth = request.headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() == "bearer" and token:
                presented = token.strip()
        if not presented:
            raise APIError(401, "missing API key: send it as x-api-key or Authorization: Bearer")
        given = presented.encode("utf-8", "surrogateescape")
        tenant = None
        for key, t in self._keys:  # no early exit: the time does not depend on which key matched
            if hmac.compare_digest(given, key):
                tenant = t
        if tenant is None:
            raise APIError(401, "invalid API key")
        return tenant
