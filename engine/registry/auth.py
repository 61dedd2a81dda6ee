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
    """skopeo's and podman's --creds, --authfile, --tls-verify, --cert-dir."""

    creds: Credentials | None = None
    authfile: str | None = None
    tls_verify: bool = True
    cert_dir: str | None = None

    def client(self, registry: str, repository: str | None, api_host: str | None = None) -> Client:
        c = creds_mod.find(registry, repository, self.creds, self.authfile)
        return Client(api_host or registry, c, self.tls_verify, self.cert_dir)


def options(creds: str | None, authfile: str | None, tls_verify: bool, cert_dir: str | None) -> RegistryOptions:
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
          tls_verify: bool = True, cert_dir: str | None = None) -> str:
    """GET /v2/ with the credentials (through the token server when the registry
    uses one); only a 200 stores them.  Returns where they were stored.
    registries.conf's `insecure` and `blocked` for the host apply, as to pull and push."""
    key, host = _login_target(registry, "login")
    e = mirrors.for_host(host)
    if e is not None and e.blocked:
        raise UsageError(f"{host} is blocked by registries.conf (prefix {e.prefix})")
    if e is not None and e.insecure:
        tls_verify = False
    c = Credentials(username, password, "login")
    client = Client(_api_host(host), c, tls_verify, cert_dir)
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
