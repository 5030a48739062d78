"""api_tokens.yml handling and key checks (part of the TabbyAPI emulator, see package doc).

Same rules as TabbyAPI's common/auth.py: keys generated with secrets.token_hex(16) only when the
file is absent, the admin key valid everywhere, the API key only on non-admin routes. Keys must be
YAML strings (pydantic `str`: an unquoted 0123 or 1e5 is not one, the start fails). The exl3
generation (main) also takes a list of api keys and polls the file every 2 s so keys can be
rotated without a restart (a broken file keeps the old keys); exl2 reads it once at start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import re
import secrets
from dataclasses import dataclass

import yaml

log = logging.getLogger("tabby_emu.auth")

POLL_INTERVAL_S = 2.0


class Yaml12Loader(yaml.SafeLoader):
    """TabbyAPI reads api_tokens.yml with ruamel (YAML 1.2), where an unquoted 123e45 is a float.

    PyYAML (YAML 1.1) would read it as a string, kinder than the real server; this resolver adds
    YAML 1.2's float form so such a key is refused here too.
    """


Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$"),
    list("-+0123456789."),
)


def _read(path: pathlib.Path) -> object:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=Yaml12Loader)  # noqa: S506 - a SafeLoader


@dataclass(frozen=True)
class AuthKeys:
    api_keys: frozenset[str]
    admin_key: str

    @classmethod
    def from_mapping(cls, data: object, api_key_list: bool = True) -> AuthKeys:
        if not isinstance(data, dict) or "admin_key" not in data or "api_key" not in data:
            raise ValueError("api_tokens.yml needs both api_key and admin_key")
        api, admin = data["api_key"], data["admin_key"]
        if not isinstance(admin, str):
            raise ValueError("api_tokens.yml: admin_key: Input should be a valid string")
        if isinstance(api, str):
            return cls(api_keys=frozenset([api]), admin_key=admin)
        if api_key_list and isinstance(api, list) and all(isinstance(k, str) for k in api):
            return cls(api_keys=frozenset(api), admin_key=admin)
        kind = "a string or a list of strings" if api_key_list else "a valid string"
        raise ValueError(f"api_tokens.yml: api_key: Input should be {kind}")


class AuthStore:
    def __init__(self, path: pathlib.Path, disabled: bool, api_key_list: bool = True) -> None:
        self.path = path
        self.disabled = disabled
        self.api_key_list = api_key_list
        self.keys: AuthKeys | None = None
        self._mtime: float | None = None

    def load_or_create(self) -> None:
        if self.disabled:
            log.warning("Disabling authentication makes your instance vulnerable.")
            return
        if self.path.exists():
            self.keys = AuthKeys.from_mapping(_read(self.path), self.api_key_list)
        else:
            data = {"api_key": secrets.token_hex(16), "admin_key": secrets.token_hex(16)}
            # 0600 from the first byte: the file holds secrets (TabbyAPI leaves this to the umask).
            # No O_EXCL: like TabbyAPI, a dangling symlink to the real location is followed.
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                yaml.safe_dump(data, handle, default_flow_style=False)
            self.keys = AuthKeys.from_mapping(data)
        self._mtime = self.path.stat().st_mtime
        log.info(
            "Your API key is: %s\nYour admin key is: %s",
            ", ".join(sorted(self.keys.api_keys)),
            self.keys.admin_key,
        )

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            self.reload_if_changed()

    def reload_if_changed(self) -> bool:
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            return False
        if mtime == self._mtime:
            return False
        self._mtime = mtime
        try:
            self.keys = AuthKeys.from_mapping(_read(self.path), self.api_key_list)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            log.warning("Failed to reload %s, keeping the previous keys: %s", self.path, exc)
            return False
        log.info("Reloaded auth keys from %s", self.path)
        return True

    def check(self, headers: dict[str, str] | object, admin: bool) -> str | None:
        """Returns None when allowed, else the 401 detail TabbyAPI sends."""
        if self.disabled:
            return None
        assert self.keys is not None
        kind = "admin" if admin else "API"
        direct = headers.get("x-admin-key" if admin else "x-api-key")  # type: ignore[attr-defined]
        if direct:
            return None if self._valid(direct, admin) else f"Invalid {kind} key"
        authorization = headers.get("authorization")  # type: ignore[attr-defined]
        if authorization:
            parts = authorization.split(" ")
            if len(parts) < 2 or parts[0].lower() != "bearer" or not self._valid(parts[1], admin):
                return f"Invalid {kind} key"
            return None
        return f"Please provide an {kind} key"

    def permission(self, headers: dict[str, str] | object) -> str:
        if self.disabled:
            return "admin"
        assert self.keys is not None
        for name in ("x-admin-key", "x-api-key", "authorization"):
            value = headers.get(name)  # type: ignore[attr-defined]
            if value:
                if value.lower().startswith("bearer "):
                    value = value.split(" ", 1)[1]
                if value == self.keys.admin_key:
                    return "admin"
                return "api" if value in self.keys.api_keys else "none"
        return "none"

    def _valid(self, key: str, admin: bool) -> bool:
        assert self.keys is not None
        if key == self.keys.admin_key:
            return True
        return not admin and key in self.keys.api_keys
