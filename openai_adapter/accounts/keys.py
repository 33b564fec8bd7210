"""API keys: random, recognisable, stored only as a hash."""
from __future__ import annotations

import hashlib
import secrets

# A fixed prefix lets secret scanners (and people) recognise a leaked key.
PREFIX = "sk-llm-"


def generate() -> str:
    """A new key: the prefix and 32 random bytes (43 url-safe base64 characters)."""
    return PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    """sha256 of the whole key, hex. Keys carry 256 random bits, so an unkeyed hash is
    enough (no dictionary to try) and every replica computes the same one."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def hint(key: str) -> str:
    """What lists show: the prefix, 4 characters, an ellipsis, the last 4."""
    return f"{key[:len(PREFIX) + 4]}…{key[-4:]}"


def looks_like_key(token: str) -> bool:
    return token.startswith(PREFIX) and 20 <= len(token) <= 200
