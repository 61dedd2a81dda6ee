"""What pull, push and login share: the registry options, and login/logout."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import NotFound, RegistryAuthError, UsageError
from ..log import get_logger
from . import creds as creds_mod, mirrors, reference
from .client import Client
from .creds import Credentials

log = get_logger("layerdb.registry")


@dataclass
class RegistryOptions:
    """skopeo's and podman's --creds, --authfile, --tls-verify, --cert-dir.

    tls_verify is podman's tri-state: None (no --tls-verify) leaves it to
    registries.conf, where an `insecure` registry or mirror may be plain HTTP or
    unverified TLS and any other is verified; True verifies even an insecure one;
    False verifies none."""

    creds: Credentials | None = None
    authfile: str | None = None
    tls_verify: bool | None = None
    cert_dir: str | None = None

    def verify(self, insecure: bool) -> bool:
        """Whether TLS is verified for a host registries.conf marks insecure (or not):
        the one place --tls-verify meets registries.conf."""
        return not insecure if self.tls_verify is None else self.tls_verify

    def client(self, registry: str, repository: str | None, api_host: str | None = None, *,
               insecure: bool = False, creds: Credentials | None = None) -> Client:
        """A Client for registry (its API at api_host); insecure: registries.conf's
        flag for the source or destination (mirrors.Source.insecure).  creds, when
        given, are used as they are (login), else found as creds_mod.find does."""
        c = creds if creds is not None else creds_mod.find(registry, repository, self.creds, self.authfile)
        return Client(api_host or registry, c, self.verify(insecure), self.cert_dir)


def options(creds: str | None, authfile: str | None, tls_verify: bool | None,
            cert_dir: str | None) -> RegistryOptions:
    return RegistryOptions(creds_mod.parse_creds(creds) if creds else None, authfile, tls_verify, cert_dir)


def _api_host(registry: str) -> str:
    return reference.DOCKER_HUB_API if registry == reference.DOCKER_HUB else registry


def _login_target(registry: str | None, verb: str) -> tuple[str, str]:
    """(auth file key, host): podman's, where no REGISTRY is the first of registries.conf's
    unqualified-search-registries."""
    if registry:
        return reference.parse_login(registry)
    from . import shortnames

    s = shortnames.settings()
    if not s.search:
        raise UsageError(f"{verb}: give a registry (registries.conf has no unqualified-search-registries "
                         "to default to)")
    host = reference.parse_registry(s.search[0])
    return host, host


def login(registry: str | None, username: str, password: str, *, authfile: str | None = None,
          tls_verify: bool | None = None, cert_dir: str | None = None) -> str:
    """GET /v2/ with the credentials (through the token server when the registry
    uses one); only a 200 stores them.  Returns where they were stored.
    registries.conf's `insecure` and `blocked` for the host apply, as to pull and push
    (tls_verify as RegistryOptions takes it)."""
    key, host = _login_target(registry, "login")
    e = mirrors.for_host(host)
    if e is not None and e.blocked:
        raise UsageError(f"{host} is blocked by registries.conf (prefix {e.prefix})")
    c = Credentials(username, password, "login")
    client = RegistryOptions(None, authfile, tls_verify, cert_dir).client(
        host, None, _api_host(host), insecure=e is not None and e.insecure, creds=c)
    try:
        r = client.request("GET", "/v2/", ok=(), what="login")
        status = r.status
        r.close()
    finally:
        client.close()
    if status != 200:
        raise RegistryAuthError(f"{host}: login as {username!r} failed ({status})")
    path = creds_mod.login_authfile(authfile)
    where = creds_mod.store(path, host, c, key)
    log.info("login", registry=key, user=username, stored=where)
    return where


def logout(registry: str | None, *, authfile: str | None = None) -> list[str]:
    key, host = _login_target(registry, "logout")
    paths = [authfile] if authfile else [p for p in creds_mod.default_authfiles() if os.path.exists(p)]
    changed = [p for p in paths if creds_mod.remove(p, host, key)]
    if not changed:
        raise NotFound(f"not logged in to {key} (no credentials in {', '.join(paths) or 'any auth file'})")
    return changed
