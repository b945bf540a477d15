"""Who a request comes from and what it may do: API keys, the admin key, the registry scope, what reuse a
caller may see. No HTTP here: ``Access.caller`` takes the ``Authorization`` header's value.

Keys are compared in constant time (sha256 digests, every key compared). A request resolves to a ``Caller``:
``anonymous`` (no keys configured, or /health), one API key (``key-<sha256 of the key>``: a stable id for quotas
and scopes that does not reveal the key; ``Caller.name`` is its short form for logs) or the admin. The registry
scope says who may register chunks (``POST /v1/chunks``), and use strategy ``prefix_cache``, which stores a
prompt's blocks for later requests as registering does, and whose prompts a registered text is matched in:

- ``open``: anyone allowed to call the server registers; every prompt is matched against every registered
  text (one registry for all callers);
- ``admin``: only the admin key registers; every caller's prompts are matched against what the admin
  registered;
- ``key``: every caller registers into a scope of its own (the engine's registry ``scope``, named by
  ``Caller.id``): its texts are matched only in its own prompts, and their stored KV is salted with the scope,
  so no caller can learn anything about another's chunks from hits, ``already_stored`` or timing.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass


class RegistryScope(str, enum.Enum):
    OPEN = "open"
    ADMIN = "admin"
    KEY = "key"


class ReuseStats(str, enum.Enum):
    """Who sees a response's reuse figures (``usage.prompt_tokens_details.cached_tokens``, the ``cacheblend``
    field's hits and tokens) and ``/v1/chunks``' ``computed`` / ``already_stored``: ``private``: only callers
    allowed to register (everyone in the open scope, the admin in the admin scope); ``public``: everyone."""

    PRIVATE = "private"
    PUBLIC = "public"


@dataclass(frozen=True)
class Caller:
    """Who sent a request. ``id``: ``anonymous``, ``admin`` or ``key-<the key's sha256, 64 hex digits>``: the whole
    digest, since it names the caller's quota and registry scope (two keys sharing a shorter prefix, which anyone
    choosing keys can find, would share both); ``name`` is its short form for logs."""

    id: str
    admin: bool = False

    @property
    def name(self) -> str:
        return self.id[: len("key-") + 12] if self.id.startswith("key-") else self.id


ANONYMOUS = Caller("anonymous")
ADMIN = Caller("admin", admin=True)


class Unauthorized(Exception):
    """A request without a valid key where one is needed (401)."""


class Forbidden(Exception):
    """A valid key that may not do this (403); the message names the option that allows it."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def parse_keys(value: str | None) -> list[str]:
    """Keys from an environment variable's value: one key, or several separated by commas."""
    return [k.strip() for k in (value or "").split(",") if k.strip()]


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Access:
    """api_keys: keys any client may use (none: no key is needed); admin_key: the key that may register
    chunks in the admin scope and read /metrics; registry_scope: ``open``, ``admin`` or ``key`` (default:
    ``admin`` when any key is set, else ``open``); reuse_stats: ``private`` (default) or ``public`` (ReuseStats)."""

    def __init__(
        self,
        api_keys: Iterable[str] = (),
        admin_key: str | None = None,
        registry_scope: str | RegistryScope | None = None,
        reuse_stats: str | ReuseStats = ReuseStats.PRIVATE,
    ) -> None:
        keys = [api_keys] if isinstance(api_keys, str) else list(api_keys)
        for key in [*keys, *([admin_key] if admin_key is not None else [])]:
            if not isinstance(key, str) or not key.strip() or key != key.strip():
                raise ValueError("an API key must be a non-empty string without surrounding whitespace")
        self._keys = {_digest(k): Caller(f"key-{_digest(k).hex()}") for k in keys}
        self._admin = _digest(admin_key) if admin_key is not None else None
        if registry_scope is None:
            registry_scope = RegistryScope.ADMIN if self.keyed else RegistryScope.OPEN
        if registry_scope not in {s.value for s in RegistryScope} | set(RegistryScope):
            raise ValueError(f"registry scope {registry_scope!r}: use open, admin or key")
        if reuse_stats not in {s.value for s in ReuseStats} | set(ReuseStats):
            raise ValueError(f"reuse stats {reuse_stats!r}: use private or public")
        self.scope, self.reuse_stats = RegistryScope(registry_scope), ReuseStats(reuse_stats)

    @property
    def keyed(self) -> bool:
        """Whether any key (API or admin) is configured."""
        return bool(self._keys) or self._admin is not None

    @property
    def needs_key(self) -> bool:
        """Whether every endpoint but /health needs a key (API keys are configured)."""
        return bool(self._keys)

    def caller(self, authorization: str | None) -> Caller:
        """The caller a request's ``Authorization`` header names; raises Unauthorized if API keys are set and it
        names none of them. Without API keys a missing or unknown key is the anonymous caller (stock clients
        send a placeholder such as ``Bearer unused``); the admin key is recognised either way."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        found = None
        if token:
            given = _digest(token)
            for digest, caller in self._keys.items():  # every key compared: no early exit on a match
                if hmac.compare_digest(digest, given):
                    found = caller
            if self._admin is not None and hmac.compare_digest(self._admin, given):
                found = ADMIN
        if found is not None:
            return found
        if self.needs_key:
            raise Unauthorized(
                "a valid API key is needed: send the header 'Authorization: Bearer <key>' with one of the keys "
                "given to --api-key (or CACHEBLEND_API_KEY)"
                if token
                else "this server needs an API key: send the header 'Authorization: Bearer <key>'"
            )
        return ANONYMOUS

    def check_register(self, caller: Caller) -> None:
        """Raise Forbidden unless ``caller`` may register chunks (POST /v1/chunks)."""
        if self.scope is RegistryScope.ADMIN and not caller.admin:
            fix = "send that key" if self._admin is not None else "start the server with one"
            raise Forbidden(
                f"registering chunks needs the admin key (--admin-key) under --registry-scope admin; {fix}, or "
                "start the server with --registry-scope open to let every client register"
            )

    def check_prefix_cache(self, caller: Caller) -> None:
        """Raise Forbidden unless ``caller`` may use strategy ``prefix_cache``: it stores the prompt's blocks in the
        caller's registry scope for later requests to reuse, as registering does (and tells a later request with the
        same prompt that it was sent: it is prefilled faster), so it takes the right to register."""
        if self.scope is RegistryScope.ADMIN and not caller.admin:
            raise Forbidden(
                "strategy prefix_cache stores the prompt's KV for every later request of the scope, which under "
                "--registry-scope admin only the admin key may do; use another strategy, or start the server with "
                "--registry-scope key (each key its own prefix cache)"
            )

    def scope_of(self, caller: Caller) -> str | None:
        """The engine's registry scope for ``caller``'s registrations and prompts: its own under ``key``, else
        the one shared scope (None)."""
        return caller.id if self.scope is RegistryScope.KEY else None

    def check_operator(self, caller: Caller) -> None:
        """Raise Forbidden unless ``caller`` may read the operator's endpoints (/metrics): the admin when an
        admin key is set, else any caller that got this far."""
        if self._admin is not None and not caller.admin:
            raise Forbidden("/metrics needs the admin key (--admin-key)")

    def sees_reuse(self, caller: Caller) -> bool:
        """Whether ``caller`` is shown reuse figures (ReuseStats)."""
        if self.reuse_stats is ReuseStats.PUBLIC or self.scope in (RegistryScope.OPEN, RegistryScope.KEY):
            return True  # under ``key`` a caller's figures are about its own scope only
        return caller.admin

    def warnings(self, host: str) -> list[str]:
        """What an operator starting a server on ``host`` with these settings should hear about."""
        out = []
        if not self.needs_key and not is_loopback(host):
            out.append(
                f"--host {host} is reachable from other machines and no --api-key is set: anyone who can reach "
                "it can use the model"
                + (" and register chunks" if self.scope is RegistryScope.OPEN else "")
                + "; pass --api-key (or set CACHEBLEND_API_KEY)"
            )
        if self.keyed and self.scope is RegistryScope.OPEN:
            out.append(
                "--registry-scope open: every client may register chunks that are reused in every other "
                "client's prompts (and learn what others registered); --registry-scope key gives each key a "
                "scope of its own, --registry-scope admin limits registration to the admin key"
            )
        if self.scope is RegistryScope.KEY and not self.needs_key:
            out.append(
                "--registry-scope key without --api-key: every client is the same caller, so they share one "
                "scope; pass --api-key (one key per client or tenant)"
            )
        if self.scope is RegistryScope.ADMIN and self._admin is None:
            out.append(
                "--registry-scope admin without --admin-key: no client can register chunks (POST /v1/chunks "
                "answers 403); pass --admin-key to register through the server"
            )
        return out
