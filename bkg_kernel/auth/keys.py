"""Key and password material: generation, hashing, constant-time checks."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
import secrets

KEY_RE = re.compile(r"^bkg_([0-9a-f]{12})_([A-Za-z0-9_-]{32,})$")
# OWASP's password storage cheat sheet: scrypt with N=2^17 (128 MiB), r=8, p=1. Older hashes keep their own
# parameters (stored in the hash) and are upgraded at the next right login (`needs_rehash`).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1
_MAXMEM = 256 * 2**20


def new_key() -> tuple[str, str, str]:
    """Return (token, prefix, secret) for a new API key `bkg_<prefix>_<secret>`."""
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return f"bkg_{prefix}_{secret}", prefix, secret


def parse_key(token: str) -> tuple[str, str] | None:
    """Return (prefix, secret) of a well-formed key, else None."""
    m = KEY_RE.fullmatch(token)
    return (m.group(1), m.group(2)) if m else None


def hash_secret(secret: str) -> str:
    """Hash a high-entropy secret (API keys, session tokens): sha256 is enough for 256 random bits."""
    return hashlib.sha256(secret.encode()).hexdigest()


def same(a: str, b: str) -> bool:
    """Compare two hashes in constant time."""
    return hmac.compare_digest(a.encode(), b.encode())


def hash_password(password: str) -> str:
    """Hash a password with scrypt (a slow, memory-hard KDF) and a random salt."""
    salt = secrets.token_bytes(16)
    dk = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=_MAXMEM, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(dk).decode()}"


@functools.cache
def _dummy() -> str:
    """A hash checked when there is no user or no password: an unknown name costs the same work as a known one."""
    return hash_password(secrets.token_urlsafe(16))


def check_password(password: str, stored: str | None) -> bool:
    """Check a password against a stored scrypt hash; without one, do the same work and say no."""
    known = bool(stored)
    try:
        _, n, r, p, salt, want = (stored or _dummy()).split("$")
        if int(n) > 2**20 or int(r) > 32 or int(p) > 16:  # a planted hash must not cost the gateway minutes
            return False
        dk = hashlib.scrypt(
            password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), maxmem=_MAXMEM, dklen=32
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(base64.b64encode(dk).decode(), want) and known


def needs_rehash(stored: str) -> bool:
    """Whether a stored hash was made with weaker parameters than today's."""
    try:
        _, n, r, p, *_ = stored.split("$")
        return (int(n), int(r), int(p)) != (SCRYPT_N, SCRYPT_R, SCRYPT_P)
    except ValueError:
        return True
