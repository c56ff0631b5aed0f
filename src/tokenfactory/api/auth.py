"""API keys and tenants.

``--api-key KEY[:TENANT]`` (repeatable), ``--api-key-file PATH`` (one ``KEY[:TENANT]`` per line)
or ``TOKENFACTORY_API_KEYS`` (comma-separated; file and variable keep keys out of ``ps``) map each
key to a tenant; the tenant becomes the request's ``cache_salt`` so one tenant's prompts can
never hit another's KV pages. Keys are compared in constant time (``hmac.compare_digest`` against
every configured key, no early exit) and are never logged; only tenant names appear in logs.

``/metrics`` (and any future ``/dashboard``) shows every tenant's traffic, so once keys exist
it takes only the operator's ``--metrics-key``: a tenant key is refused (403), no key is a 401.
"""
from __future__ import annotations

import hmac

from starlette.requests import Request

from tokenfactory.api.errors import APIError


ENV_API_KEYS = "TOKENFACTORY_API_KEYS"
ENV_METRICS_KEY = "TOKENFACTORY_METRICS_KEY"


def parse_api_key(spec: str) -> tuple[str, str]:
    """``KEY[:TENANT]`` -> (key, tenant). Without a tenant, each key is its own tenant."""
    key, sep, tenant = spec.partition(":")
    if not key:
        raise ValueError("empty API key")
    if not sep or not tenant:
        tenant = "key-" + hmac.new(b"tokenfactory-tenant", key.encode(), "sha256").hexdigest()[:12]
    return key, tenant


def read_api_key_file(path: str) -> list[str]:
    """``KEY[:TENANT]`` specs from a file: one per line; blank lines and ``#`` comments skipped."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]


def collect_api_keys(specs: list[str], files: list[str], environ) -> dict[str, str]:
    """key -> tenant from the command line, key files and ``TOKENFACTORY_API_KEYS``.
    Raises ValueError (empty key) or OSError (unreadable file)."""
    all_specs = list(specs)
    for path in files:
        all_specs += read_api_key_file(path)
    all_specs += [s.strip() for s in environ.get(ENV_API_KEYS, "").split(",") if s.strip()]
    return dict(parse_api_key(s) for s in all_specs)


def presented_key(request: Request) -> str | None:
    """The key a request carries: ``x-api-key``, else ``Authorization: Bearer``. An empty
    ``x-api-key`` header does not hide a bearer token."""
    presented = (request.headers.get("x-api-key") or "").strip()
    if not presented:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer":
            presented = token.strip()
    return presented or None


class Authenticator:
    def __init__(self, api_keys: dict[str, str] | None, metrics_key: str | None = None):
        # Encoded once; compare_digest needs equal types.
        self._keys = [(k.encode(), t) for k, t in (api_keys or {}).items()]
        self._metrics_key = metrics_key.encode() if metrics_key else None

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @property
    def metrics_protected(self) -> bool:
        """True when /metrics needs a key (API keys or a metrics key are configured)."""
        return bool(self._keys) or self._metrics_key is not None

    def check_metrics_access(self, request: Request) -> None:
        """Raises 401/403 unless the request may read server-wide metrics."""
        if not self.metrics_protected:
            return
        presented = presented_key(request)
        if self._metrics_key is None:
            raise APIError(403, "metrics are off while API keys are configured: start the "
                                "server with --metrics-key to scrape them")
        if not presented:
            raise APIError(401, "missing metrics key: send it as x-api-key or "
                                "Authorization: Bearer")
        given = presented.encode("utf-8", "surrogateescape")
        if hmac.compare_digest(given, self._metrics_key):
            return
        if self._match(given) is not None:
            raise APIError(403, "a tenant key cannot read server-wide metrics; use the "
                                "--metrics-key key")
        raise APIError(401, "invalid metrics key")

    def _match(self, given: bytes) -> str | None:
        tenant = None
        for key, t in self._keys:  # no early exit: the time does not depend on which key matched
            if hmac.compare_digest(given, key):
                tenant = t
        return tenant

    def tenant_for(self, request: Request) -> str | None:
        """The caller's tenant (None when auth is off). Raises 401 without a valid key."""
        if not self._keys:
            return None
        presented = presented_key(request)
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
