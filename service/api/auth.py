"""API-key authentication: keys are configured as sha256 digests, checked per request by path.

Keys are random tokens sent as `Authorization: Bearer <key>` or `X-API-Key: <key>`. Only their sha256
hex digests are configured (`CXR_API_KEY_SHA256S` and/or a keys file of `name:sha256hex` lines), so a
leaked configuration or log does not leak a usable key. The keys file is re-read when it changes, so
keys rotate without a restart. `python -m service.api.auth new-key` makes a key and its digest.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import re
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from service.errors import Forbidden, Unauthorized

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger("service.api.auth")

_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")  # names go into log lines: nothing that could forge one
_DIGEST = re.compile(r"^[0-9a-fA-F]{64}$")
HEALTH_PATHS = ("/healthz", "/readyz")
METRICS_PATHS = ("/metrics",)
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
DOCS_ASSETS = "/docs-assets/"  # Swagger UI's and ReDoc's scripts and styles (service/api/docs.py)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> tuple[str, str]:
    """A random key (256 bits, URL-safe) and its sha256 hex digest."""
    key = secrets.token_urlsafe(32)
    return key, hash_key(key)


def parse_key_entry(entry: str) -> tuple[str, str]:
    """`name:sha256hex` or a bare `sha256hex` → (name, lowercase digest).

    Bare digests are named by their first 8 hex digits.

    Raises ValueError without echoing the entry: a mistaken entry may be a plaintext key.
    """
    name, _, digest = entry.strip().rpartition(":")
    if not _DIGEST.match(digest):
        raise ValueError(
            "expected a sha256 hex digest (64 hex digits), optionally as name:digest; "
            "configure the digest from `python -m service.api.auth new-key`, never the key itself"
        )
    if name and not _NAME.match(name):
        raise ValueError("key names may hold only letters, digits and . _ @ - (at most 64)")
    digest = digest.lower()
    return name or f"sha256:{digest[:8]}", digest


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key from `Authorization: Bearer …`, else from `X-API-Key`; None when neither carries one."""
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key", "").strip() or None


class KeyRing:
    """The accepted key digests: those in settings plus those in the keys file, reloaded when the file changes."""

    def __init__(self, inline: list[str], keys_file: Path | None) -> None:
        self._inline: list[tuple[str, str]] = []
        for number, entry in enumerate(inline, 1):
            try:
                self._inline.append(parse_key_entry(entry))
            except ValueError as error:
                raise ValueError(f"CXR_API_KEY_SHA256S entry {number}: {error}") from None
        self._file = keys_file
        self._file_keys: list[tuple[str, str]] = []
        self._file_stamp: tuple[int, int, int] | None = (-1, -1, -1)  # never a real stamp: the first check reads
        if keys_file is not None:
            if not keys_file.is_file():
                raise ValueError(f"CXR_API_KEYS_FILE {keys_file} does not exist")
            self._refresh()
        if not self._inline and not self._file_keys:
            raise ValueError(
                "authentication is on but no API key digest is configured: set CXR_API_KEY_SHA256S or "
                "CXR_API_KEYS_FILE (`python -m service.api.auth new-key` makes a key and its digest)"
            )

    def _refresh(self) -> None:
        """Re-read the keys file when its mtime, size or inode changed (one stat per request: cheap)."""
        try:
            info = self._file.stat()
            stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
        except OSError:
            stamp = None
        if stamp == self._file_stamp:
            return
        self._file_stamp = stamp
        keys: list[tuple[str, str]] = []
        try:
            lines = self._file.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            # Fail closed: a removed or unreadable file revokes its keys rather than keeping stale ones.
            log.warning("API keys file %s unreadable (%s): its keys are not accepted", self._file, type(error).__name__)
            lines = []
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                keys.append(parse_key_entry(line))
            except ValueError as error:
                # The line number only: the line itself may be a plaintext key pasted by mistake.
                log.warning("API keys file %s line %d skipped: %s", self._file, number, error)
        self._file_keys = keys
        log.info("API keys file %s loaded: %d key(s) (%s)", self._file, len(keys), ", ".join(name for name, _ in keys))

    def identify(self, key: str) -> str | None:
        """The name of the configured key matching `key`, or None."""
        if self._file is not None:
            self._refresh()
        digest = hash_key(key)
        match = None
        # compare_digest on every entry, no early exit: timing says nothing about which digest (or how much) matched.
        for name, expected in [*self._inline, *self._file_keys]:
            if hmac.compare_digest(digest, expected) and match is None:
                match = name
        return match


def requires_key(path: str, settings: Settings) -> bool:
    """Whether a request to `path` needs a key. Everything not explicitly opened does, unknown paths included."""
    if not settings.auth_enabled:
        return False
    if path in HEALTH_PATHS:
        return settings.auth_protect_health
    if path in METRICS_PATHS or path.startswith("/metrics/"):
        return settings.auth_protect_metrics
    if path in DOCS_PATHS or path.startswith(DOCS_ASSETS):
        return settings.auth_protect_docs
    return True


def authenticate(headers: Mapping[str, str], keys: KeyRing) -> str:
    """The caller's key name; raises Unauthorized (no key sent) or Forbidden (a key no digest matches)."""
    key = presented_key(headers)
    if key is None:
        raise Unauthorized("An API key is required: send `Authorization: Bearer <key>` or `X-API-Key: <key>`.")
    name = keys.identify(key)
    if name is None:
        raise Forbidden("The API key is not valid.")
    return name


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service.api.auth", description="API key helper for hospital IT.")
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("new-key", help="print a new random key and the sha256 digest to configure")
    make.add_argument("--name", default="client", help="name for the keys-file line (shown in logs; not secret)")
    commands.add_parser("hash", help="read a key on stdin and print its sha256 digest")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.command == "hash":
        print(hash_key(sys.stdin.readline().strip()))
        return
    if not _NAME.match(args.name):
        parser.error("--name may hold only letters, digits and . _ @ - (at most 64)")
    key, digest = new_key()
    print(f"key:    {key}")
    print(f"sha256: {digest}")
    print(f"keys-file line: {args.name}:{digest}")
    print("The key is printed once and stored nowhere: hand it to the client now. Configure only the sha256.")


if __name__ == "__main__":
    main()
