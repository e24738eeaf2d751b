"""Credentials at rest: AES-256-GCM under key-encryption keys that an operator supplies and rotates.

HERALD_SECRET_KEYS holds `id:base64key` pairs separated by commas; the first key seals, every
listed key opens. To rotate, put a new key first, keep the old ones listed, restart (or run
`herald-reseal-secrets`), and drop the old keys once nothing is sealed under them.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}\Z")


class SecretKeysError(ValueError):
    """HERALD_SECRET_KEYS is missing or malformed, or a row is sealed under a key not listed."""


def new_key_setting(key_id: str) -> str:
    """A fresh `id:base64key` entry for HERALD_SECRET_KEYS."""
    return f"{key_id}:{base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()}"


@dataclass(frozen=True)
class Sealed:
    key_id: str
    data: bytes  # nonce followed by ciphertext and tag


class SecretBox:
    def __init__(self, keys: dict[str, bytes], current: str) -> None:
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self.current = current

    @classmethod
    def from_setting(cls, setting: str) -> SecretBox:
        entries = [e.strip() for e in setting.split(",") if e.strip()]
        if not entries:
            raise SecretKeysError(
                "HERALD_SECRET_KEYS is not set: destination credentials are encrypted with it. "
                "Create one with `herald-secret-key` and keep it in a Kubernetes Secret"
            )
        keys: dict[str, bytes] = {}
        for entry in entries:
            key_id, _, encoded = entry.partition(":")
            if not _KEY_ID.match(key_id):
                raise SecretKeysError(
                    f"HERALD_SECRET_KEYS: key id {key_id!r} must be 1-32 of A-Z a-z 0-9 _ -"
                )
            try:
                key = base64.b64decode(encoded, validate=True)
            except binascii.Error:
                raise SecretKeysError(f"HERALD_SECRET_KEYS: key {key_id!r} is not base64") from None
            if len(key) != 32:
                raise SecretKeysError(f"HERALD_SECRET_KEYS: key {key_id!r} must be 32 bytes (AES-256)")
            if key_id in keys:
                raise SecretKeysError(f"HERALD_SECRET_KEYS: key id {key_id!r} is listed twice")
            keys[key_id] = key
        return cls(keys, entries[0].partition(":")[0])

    def seal(self, plaintext: bytes, context: bytes) -> Sealed:
        """Encrypts under the current key; `context` (the row's id) must match when opening, so a
        sealed value copied to another row does not open."""
        nonce = os.urandom(NONCE_BYTES)
        return Sealed(self.current, nonce + self._ciphers[self.current].encrypt(nonce, plaintext, context))

    def open(self, sealed: Sealed, context: bytes) -> bytes:
        cipher = self._ciphers.get(sealed.key_id)
        if cipher is None:
            raise SecretKeysError(
                f"a credential is sealed under key {sealed.key_id!r}, which HERALD_SECRET_KEYS does not list"
            )
        try:
            return cipher.decrypt(sealed.data[:NONCE_BYTES], sealed.data[NONCE_BYTES:], context)
        except InvalidTag:
            raise SecretKeysError(f"a credential sealed under key {sealed.key_id!r} does not open") from None


def main() -> None:
    """`herald-secret-key [id]`: prints a new HERALD_SECRET_KEYS entry."""
    import sys

    print(new_key_setting(sys.argv[1] if len(sys.argv) > 1 else "k1"))
