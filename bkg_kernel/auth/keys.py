"""Key and password material: generation, hashing, constant-time checks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

KEY_RE = re.compile(r"^bkg_([0-9a-f]{12})_([A-Za-z0-9_-]{32,})$")
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


def new_key() -> tuple[str, str, str]:
    """Return (token, prefix, secret) for a new API key `bkg_<prefix>_<secret>`."""
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return f"bkg_{prefix}_{secret}", prefix, secret


def parse_key(token: str) -> tuple[str, str] | None:
    """Return (prefix, secret) of a well-formed key, else None."""
    m = KEY_RE.match(token)
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
    dk = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(dk).decode()}"


def check_password(password: str, stored: str | None) -> bool:
    """Check a password against a stored scrypt hash."""
    if not stored:
        return False
    try:
        _, n, r, p, salt, want = stored.split("$")
        dk = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=32)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(base64.b64encode(dk).decode(), want)
