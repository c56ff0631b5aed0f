"""Signed thinking blocks: a thinking block this server sends out carries a signature, so one
coming back in a later turn can be checked (and, for ``thinking.display: "omitted"``, its text
recovered) before it is rendered into the prompt again."""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets

# Thinking blocks are signed so that one coming back in a later turn can be checked: an
# HMAC-SHA256 of its text. The key comes from TOKENFACTORY_THINKING_KEY (so signatures survive
# a restart and hold across replicas), else it is drawn once per process.
_THINKING_KEY = (os.environ.get("TOKENFACTORY_THINKING_KEY", "").encode()
                 or secrets.token_bytes(32))


# thinking.display "omitted": the block goes out without its text and the signature carries
# it (base64, readable: omitted is about display, not secrecy), so it can be rendered back.
_OMITTED = "tfo1."


def sign_thinking(text: str, omitted: bool = False) -> str:
    mac = hmac.new(_THINKING_KEY, text.encode("utf-8", "surrogatepass"), hashlib.sha256)
    sig = base64.b64encode(mac.digest()).decode()
    if not omitted:
        return sig
    body = base64.urlsafe_b64encode(text.encode("utf-8", "surrogatepass")).decode()
    return f"{_OMITTED}{body}.{sig}"


def thinking_signature_ok(text: str, signature: str | None) -> bool:
    return verified_thinking(text, signature) is not None


def verified_thinking(text: str, signature: str | None) -> str | None:
    """The reasoning a returned thinking block stands for (its text, or for an omitted one
    the text its signature carries), or None when this server did not sign it."""
    if not signature:
        return None
    if signature.startswith(_OMITTED):
        try:
            body, mac = signature[len(_OMITTED):].rsplit(".", 1)
            inner = base64.urlsafe_b64decode(body.encode()).decode("utf-8", "surrogatepass")
        except (ValueError, UnicodeDecodeError):
            return None
        ok = (not text or text == inner) and hmac.compare_digest(sign_thinking(inner), mac)
        return inner if ok else None
    return text if hmac.compare_digest(sign_thinking(text), signature) else None
