"""API keys of the HTTP API, kept only as hashes in one JSON file (``MEMSTREAM_API_KEYS_FILE``).

Why a file under MEMSTREAM_HOME and not Redis: Redis is a cache that may forget (a restart without persistence
empties it), and forgetting the keys would lock every client out, or worse, let a revoked key back in if the
set were rebuilt from somewhere else. A small file survives restarts, is easy to back up, and needs no service.

A key reads ``ms_<id>_<secret>``: ``id`` (8 hex characters) finds the entry, the secret is 32 random bytes
(url-safe base64). The file keeps ``sha256(key)`` only; a slow password hash buys nothing for 256 bits of
entropy, and the comparison runs in constant time (:func:`hmac.compare_digest`). Each key is bound to one
tenant and one role; roles nest: ``read`` (search, get, context) < ``write`` (also publish events) < ``admin``
(also /metrics and operator routes).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson

from schemas.errors import ConfigError, SchemaError
from schemas.events import validate_id

KEY_PREFIX = "ms_"
FILE_VERSION = 1


class Role(StrEnum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, needed: Role) -> bool:
        """Roles nest: admin may do what write may, write what read may."""
        return self.rank >= needed.rank


_RANKS = {Role.READ: 1, Role.WRITE: 2, Role.ADMIN: 3}


def parse_role(value: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise SchemaError(f"unknown role {value!r} (expected read, write or admin)", field="role") from None


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One key as the file keeps it: never the key itself, only its hash."""

    key_id: str
    tenant: str
    role: Role
    key_hash: str
    created_at: str  # ISO 8601, UTC
    revoked_at: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.key_id,
            "tenant": self.tenant,
            "role": self.role.value,
            "sha256": self.key_hash,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
        }

    def public(self) -> dict[str, Any]:
        """What ``keys list`` shows: everything but the hash."""
        body = self.to_dict()
        del body["sha256"]
        return body

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> ApiKey:
        return cls(
            key_id=str(body["id"]),
            tenant=str(body["tenant"]),
            role=Role(body["role"]),
            key_hash=str(body["sha256"]),
            created_at=str(body["created_at"]),
            revoked_at=body.get("revoked_at"),
        )


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the tenant and role of the key that authenticated the request."""

    tenant: str
    role: Role
    key_id: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh ``(key_id, key)``."""
    key_id = secrets.token_hex(4)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(key: str) -> str | None:
    """The id part of a well-formed key, else ``None``."""
    if not key.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = key[len(KEY_PREFIX) :].partition("_")
    if not sep or len(key_id) != 8 or not secret:
        return None
    return key_id


class KeyStore:
    """The keys file: read on demand (re-read when it changed, so a revoke takes effect without a restart)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._path_name = str(path)
        self._keys: dict[str, ApiKey] = {}
        self._stamp: tuple[int, int] | None = None
        # keys that authenticated since the file was last read: a request then costs a stat, not a SHA-256
        self._verified: dict[str, Principal] = {}

    # ------------------------------------------------------------------------------------------- reading

    def entries(self) -> list[ApiKey]:
        self._refresh()
        return sorted(self._keys.values(), key=lambda k: (k.created_at, k.key_id))

    def authenticate(self, key: str) -> Principal | None:
        """The principal of an active key, else ``None`` (unknown, malformed, revoked or wrong secret)."""
        key_id = key_id_of(key)
        if key_id is None:
            return None
        self._refresh()
        known = self._verified.get(key)
        if known is not None:  # this very key passed the check since the file last changed
            return known
        entry = self._keys.get(key_id)
        # hash even when the id is unknown: the time taken says nothing about which ids exist
        presented = hash_key(key)
        if entry is None or not hmac.compare_digest(presented, entry.key_hash) or not entry.active:
            return None
        principal = Principal(entry.tenant, entry.role, entry.key_id)
        self._verified[key] = principal  # at most one per active key: only keys that passed are kept
        return principal

    def _refresh(self) -> None:
        """Re-read the file when its stamp moved (a stat per request: a revoke works on the next one)."""
        try:
            st = os.stat(self._path_name)  # not Path.stat: its wrapping was half of this on the request path
        except FileNotFoundError:
            self._keys, self._stamp = {}, None
            self._verified.clear()
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._keys = {k.key_id: k for k in _read(self.path)}
            self._stamp = stamp
            self._verified.clear()

    # ------------------------------------------------------------------------------------------- changing

    def create(self, tenant: str, role: Role) -> tuple[ApiKey, str]:
        """Add a key; returns the entry and the key (shown once, never stored)."""
        validate_id(tenant, "tenant")
        with self._locked() as keys:
            key_id, key = new_key()
            while key_id in keys:
                key_id, key = new_key()
            entry = ApiKey(key_id, tenant, role, hash_key(key), _now())
            keys[key_id] = entry
        return entry, key

    def revoke(self, key_id: str) -> ApiKey:
        with self._locked() as keys:
            entry = keys.get(key_id)
            if entry is None:
                raise SchemaError(f"no key with id {key_id!r} (see `memstream keys list`)", field="id")
            if entry.active:
                entry = ApiKey(entry.key_id, entry.tenant, entry.role, entry.key_hash, entry.created_at, _now())
                keys[key_id] = entry
        return entry

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, ApiKey]]:
        """Read-modify-write under an exclusive lock; the file is replaced atomically, readable by its owner only."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            keys = {k.key_id: k for k in _read(self.path)} if self.path.exists() else {}
            yield keys
            body = {"version": FILE_VERSION, "keys": [k.to_dict() for k in keys.values()]}
            tmp = self.path.with_name(self.path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(orjson.dumps(body, option=orjson.OPT_INDENT_2))
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        self._stamp = None


def _read(path: Path) -> list[ApiKey]:
    try:
        body = orjson.loads(path.read_bytes())
        return [ApiKey.from_dict(k) for k in body["keys"]]
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"the API keys file {path} cannot be read: {exc}") from exc


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
