"""Redemption codes (docs/rules.md rule 11). Pure rules: making, normalising, checking, hashing.

A code is 15 random Crockford base32 symbols (75 bits) and one Luhn mod 32 check symbol,
shown as `XXXX-XXXX-XXXX-XXXX`. Input forgives case, spaces and hyphens, and reads I and L as
1, O as 0. The check symbol catches every single mistyped symbol and most swaps before the
database is asked. Tally stores only a versioned HMAC of the code (keyed by a pepper derived
from `TALLY_SECRET_KEY`) and its last 4 symbols; the plaintext lives only in the email.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Final

ALPHABET: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_VALUE: Final = {symbol: value for value, symbol in enumerate(ALPHABET)}
_BASE: Final = len(ALPHABET)
RANDOM_SYMBOLS: Final = 15
LENGTH: Final = RANDOM_SYMBOLS + 1
GROUP: Final = 4
#: The version of the HMAC scheme, stored with every digest so the pepper can be rotated.
DIGEST_VERSION: Final = "v1"
_PEPPER_LABEL: Final = b"tally redemption code pepper v1"
_READS_AS: Final = str.maketrans({"I": "1", "L": "1", "O": "0", " ": None, "-": None})


def check_symbol(body: str) -> str:
    """Luhn mod N (N = 32) over `body`: the symbol that makes the whole string check."""
    total = 0
    factor = 2
    for symbol in reversed(body):
        addend = factor * _VALUE[symbol]
        total += addend // _BASE + addend % _BASE
        factor = 1 if factor == 2 else 2
    return ALPHABET[(_BASE - total % _BASE) % _BASE]


def checks(code: str) -> bool:
    """Whether a normalised code's last symbol is its check symbol."""
    if len(code) != LENGTH or any(symbol not in _VALUE for symbol in code):
        return False
    return check_symbol(code[:-1]) == code[-1]


def new_code() -> str:
    """A fresh code, normalised (16 symbols, no hyphens)."""
    body = "".join(secrets.choice(ALPHABET) for _ in range(RANDOM_SYMBOLS))
    return body + check_symbol(body)


def normalise(text: str) -> str | None:
    """What a person typed, as a normalised code; None when it cannot be one (wrong length,
    symbols outside the alphabet, a failed check symbol)."""
    if not isinstance(text, str) or len(text) > 64:
        return None
    candidate = text.upper().translate(_READS_AS)
    return candidate if checks(candidate) else None


def display(code: str) -> str:
    """`XXXX-XXXX-XXXX-XXXX`, the one form shown to people."""
    assert len(code) == LENGTH
    return "-".join(code[i : i + GROUP] for i in range(0, LENGTH, GROUP))


def last4(code: str) -> str:
    return code[-4:]


def pepper(secret_key: str) -> bytes:
    """The HMAC key for codes, derived from the operator's secret so it is never the secret."""
    assert secret_key, "TALLY_SECRET_KEY is required to store codes"
    return hmac.new(secret_key.encode(), _PEPPER_LABEL, hashlib.sha256).digest()


def digest(code: str, key: bytes) -> str:
    """`v1:<hex>`: what the database stores and looks codes up by."""
    mac = hmac.new(key, code.encode(), hashlib.sha256).hexdigest()
    return f"{DIGEST_VERSION}:{mac}"
