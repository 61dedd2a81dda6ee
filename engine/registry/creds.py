"""Registry credentials: --creds, auth files, docker credential helpers, login/logout.

Lookup order, as skopeo and podman read them: --creds; else --authfile; else
$REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json,
~/.config/containers/auth.json, ~/.docker/config.json, the first that has an
entry.  A file is docker's config.json or containers' auth.json (same `auths`
shape); in it `credHelpers[host]`, then `auths`, then `credsStore` answer.  A
helper is `docker-credential-NAME get` with the server on stdin.

A password lives only in a Credentials object, whose repr and str hide it, so a
log line, an error or a traceback's locals never show it.
"""

from __future__ import annotations

import base64
import json
import os

from ..errors import RegistryAuthError, UsageError
from ..log import get_logger
from .reference import DOCKER_HUB, DOCKER_HUB_CRED_KEY

log = get_logger("layerdb.registry")

HELPER_TIMEOUT = 30  # seconds: a helper may ask a keychain


class Credentials:
    """A user name and a secret (password, or an identity token when user is '<token>')."""

    __slots__ = ("username", "_secret", "source")

    def __init__(self, username: str, secret: str, source: str = ""):
        self.username = username
        self._secret = secret
        self.source = source  # where they came from, for messages: '--creds', a file, a helper

    @property
    def secret(self) -> str:
        return self._secret

    @property
    def identity_token(self) -> str | None:
        return self._secret if self.username == "<token>" else None

    def basic(self) -> str:
        raw = f"{self.username}:{self._secret}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, secret=<hidden>, source={self.source!r})"

    __str__ = __repr__

    def __reduce__(self):  # never pickled with the secret
        raise TypeError("Credentials are not picklable")


def parse_creds(value: str) -> Credentials:
    """--creds USER[:PASSWORD]; without a password it is empty (as skopeo, which would prompt)."""
    user, _, password = value.partition(":")
    if not user:
        raise UsageError("--creds: expected USER[:PASSWORD]")
    return Credentials(user, password, "--creds")


def default_authfiles() -> list[str]:
    """The files read when no --authfile is given, in order."""
    out = []
    env = os.environ.get("REGISTRY_AUTH_FILE")
    if env:
        out.append(env)
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run:
        out.append(os.path.join(run, "containers", "auth.json"))
    cfg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    out.append(os.path.join(cfg, "containers", "auth.json"))
    docker = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    out.append(os.path.join(docker, "config.json"))
    return out


def login_authfile(authfile: str | None) -> str:
    """The file login writes: --authfile, else $REGISTRY_AUTH_FILE, else
    $XDG_RUNTIME_DIR/containers/auth.json, else ~/.docker/config.json (DESIGN.md)."""
    if authfile:
        return authfile
    env = os.environ.get("REGISTRY_AUTH_FILE")
    if env:
        return env
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run:
        return os.path.join(run, "containers", "auth.json")
    docker = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(docker, "config.json")


def _keys(host: str, repository: str | None) -> list[str]:
    """auths keys that may hold the host's entry, most specific first.  containers
    auth.json allows HOST/NAMESPACE keys; docker writes https://HOST and, for
    Docker Hub, https://index.docker.io/v1/."""
    keys = []
    if repository:
        parts = repository.split("/")
        for i in range(len(parts), 0, -1):
            keys.append(f"{host}/{'/'.join(parts[:i])}")
    keys += [host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"https://{host}/v2/"]
    if host == DOCKER_HUB:
        keys += [DOCKER_HUB_CRED_KEY, "index.docker.io", "registry-1.docker.io", "https://index.docker.io"]
    return keys


def _read(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read() or b"{}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UsageError(f"auth file {path}: cannot read it ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise UsageError(f"auth file {path}: not a JSON object")
    return data


def _entry(entry: object, path: str, key: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    token = entry.get("identitytoken")
    auth = entry.get("auth")
    user = pw = None
    if isinstance(auth, str) and auth:
        try:
            user, sep, pw = base64.b64decode(auth).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise UsageError(f"auth file {path}: the entry for {key} is not base64 USER:PASSWORD") from None
        if not sep:
            raise UsageError(f"auth file {path}: the entry for {key} is not base64 USER:PASSWORD")
    elif isinstance(entry.get("username"), str):
        user, pw = entry["username"], str(entry.get("password") or "")
    if isinstance(token, str) and token:
        return Credentials("<token>", token, path)
    if user:
        return Credentials(user, pw or "", path)
    return None


def helper_server(host: str) -> str:
    return DOCKER_HUB_CRED_KEY if host == DOCKER_HUB else host


def run_helper(name: str, action: str, payload: str) -> str:
    import subprocess  # only where a docker config names a credential helper: ~3 ms of a pull's start

    prog = f"docker-credential-{name}"
    try:
        p = subprocess.run([prog, action], input=payload.encode(), capture_output=True, timeout=HELPER_TIMEOUT)
    except FileNotFoundError:
        raise RegistryAuthError(f"credential helper {prog} is not installed (named in the docker config)") from None
    except subprocess.TimeoutExpired:
        raise RegistryAuthError(f"credential helper {prog} did not answer within {HELPER_TIMEOUT} s") from None
    if p.returncode != 0:
        out = p.stdout.decode(errors="replace").strip()
        if "credentials not found" in out.lower():
            return ""
        # The helper's output may echo what it was given, never show it.
        raise RegistryAuthError(f"credential helper {prog} {action} failed (exit {p.returncode})")
    return p.stdout.decode(errors="replace")


def _from_helper(name: str, host: str) -> Credentials | None:
    out = run_helper(name, "get", helper_server(host))
    if not out.strip():
        return None
    try:
        data = json.loads(out)
        user, secret = data["Username"], data["Secret"]
    except (ValueError, KeyError, TypeError):
        raise RegistryAuthError(f"credential helper docker-credential-{name} gave no Username/Secret") from None
    if not isinstance(user, str) or not isinstance(secret, str) or not (user or secret):
        return None
    return Credentials(user, secret, f"docker-credential-{name}")


def lookup_file(path: str, host: str, repository: str | None = None) -> Credentials | None:
    data = _read(path)
    if data is None:
        return None
    helpers = data.get("credHelpers")
    if isinstance(helpers, dict):
        for key in (host, helper_server(host)):
            if isinstance(helpers.get(key), str) and helpers[key]:
                return _from_helper(helpers[key], host)
    auths = data.get("auths")
    if isinstance(auths, dict):
        for key in _keys(host, repository):
            if key in auths:
                c = _entry(auths[key], path, key)
                if c is not None:
                    return c
    store = data.get("credsStore")
    if isinstance(store, str) and store:
        return _from_helper(store, host)
    return None


def find(host: str, repository: str | None = None, creds: Credentials | None = None,
         authfile: str | None = None) -> Credentials | None:
    """The credentials for host (and repository), or None for anonymous access."""
    if creds is not None:
        return creds
    if authfile:
        if not os.path.exists(authfile):
            raise UsageError(f"--authfile {authfile}: no such file")
        return lookup_file(authfile, host, repository)
    for path in default_authfiles():
        c = lookup_file(path, host, repository)
        if c is not None:
            log.debug("credentials", registry=host, source=path)
            return c
    return None


def _write(path: str, data: dict) -> None:
    """Atomically, mode 0600 from the first byte (a rename of a private temp file)."""
    import tempfile  # login and logout only

    d = os.path.dirname(path) or "."
    os.makedirs(d, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".auth-", dir=d)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(data, indent="\t").encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def store(path: str, host: str, creds: Credentials, key: str | None = None) -> str:
    """Record creds for host (or for the namespace key HOST/NS, reference.parse_login)
    in the auth file, or the helper it names; returns where."""
    data = _read(path) or {}
    helpers = data.get("credHelpers") if isinstance(data.get("credHelpers"), dict) else {}
    helper = helpers.get(host) or data.get("credsStore")
    namespaced = key is not None and key != host
    if isinstance(helper, str) and helper:
        if namespaced:
            # A helper keeps one secret per server URL: it would file this under
            # the host, for every repository (containers/image refuses it too).
            raise UsageError(f"login {key}: credential helper docker-credential-{helper} cannot keep a "
                             f"namespace's credentials; log in to {host}")
        payload = json.dumps({"ServerURL": helper_server(host), "Username": creds.username, "Secret": creds.secret})
        run_helper(helper, "store", payload)
        return f"docker-credential-{helper}"
    auths = data.setdefault("auths", {})
    if not isinstance(auths, dict):
        raise UsageError(f"auth file {path}: 'auths' is not an object")
    if not namespaced:
        key = DOCKER_HUB_CRED_KEY if host == DOCKER_HUB and path.endswith("config.json") else host
    auths[key] = {"auth": base64.b64encode(f"{creds.username}:{creds.secret}".encode()).decode()}
    _write(path, data)
    return path


def remove(path: str, host: str, key: str | None = None) -> bool:
    """Drop host's entries from the auth file (and its helper), or only the namespace
    key's entry; False when there were none."""
    data = _read(path)
    if data is None:
        return False
    if key is not None and key != host:
        auths = data.get("auths")
        if not isinstance(auths, dict) or key not in auths:
            return False
        del auths[key]
        _write(path, data)
        return True
    found = False
    helpers = data.get("credHelpers") if isinstance(data.get("credHelpers"), dict) else {}
    helper = helpers.get(host) or data.get("credsStore")
    if isinstance(helper, str) and helper:
        try:
            run_helper(helper, "erase", helper_server(host))
            found = True
        except RegistryAuthError:
            pass
    auths = data.get("auths")
    if isinstance(auths, dict):
        for key in _keys(host, None):
            if key in auths:
                del auths[key]
                found = True
        if found:
            _write(path, data)
    return found
