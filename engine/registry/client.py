"""HTTP to one registry: urllib3 pools, TLS, redirects, retries and the 401 challenge flow.

One Client per registry host.  Connections are kept alive per host (urllib3
pools).  TLS is verified unless tls_verify=False, which also allows plain HTTP:
the first request tries https and falls back to http only then (as podman does
with an insecure registry).  CAs (`*.crt`) and a client certificate (`*.cert` +
`*.key`) come from --cert-dir, else the first of the per-host directories
~/.config/containers/certs.d/HOST[:PORT], /etc/containers/certs.d/HOST[:PORT],
/etc/docker/certs.d/HOST[:PORT] that exists; CAs add to the system's.

Redirects are followed by hand (blob storage answers with 307 to a CDN or a
presigned URL): Authorization goes along only while the host stays the same.
429 and 5xx answers, and connections that fail before an answer, are retried
with exponential backoff, honouring Retry-After, RETRIES times at most.
"""

from __future__ import annotations

import email.utils
import os
import re
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable
from urllib.parse import urlencode, urljoin, urlsplit

import urllib3
from urllib3.exceptions import HTTPError as _U3Error
from urllib3.exceptions import (MaxRetryError, NameResolutionError, NewConnectionError, ProtocolError,
                                SSLError, TimeoutError as _U3Timeout)

from ..errors import (RegistryAuthError, RegistryError, RegistryNotFound, RegistryProtocolError,
                      RegistryRateLimited, RegistryTLSError, RegistryUnreachable, UsageError)
from ..log import get_logger
from .creds import Credentials

log = get_logger("layerdb.registry")

USER_AGENT = "layerdb/0.1"
RETRIES = 4  # retries after the first attempt, for 429, 5xx and failed connections
BACKOFF = 0.5  # seconds before the first retry; doubles each time
MAX_WAIT = 30.0  # the longest wait honoured from a Retry-After, seconds
MAX_REDIRECTS = 10
CONNECT_TIMEOUT = 30.0
READ_TIMEOUT = 120.0
RETRY_STATUS = (429, 500, 502, 503, 504)
TOKEN_MARGIN = 10.0  # seconds: a token this close to its expiry is renewed before use
MAX_TOKEN_RESPONSE = 1 << 20


def cert_dir_for(host: str, cert_dir: str | None) -> str | None:
    if cert_dir:
        if not os.path.isdir(cert_dir):
            raise UsageError(f"--cert-dir {cert_dir}: no such directory")
        return cert_dir
    cfg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    for base in (os.path.join(cfg, "containers", "certs.d"), "/etc/containers/certs.d", "/etc/docker/certs.d"):
        d = os.path.join(base, host)
        if os.path.isdir(d):
            return d
    return None


def ssl_context(host: str, verify: bool, cert_dir: str | None) -> ssl.SSLContext:
    if verify:
        ctx = ssl.create_default_context()
    else:
        # Without verification the system's CAs are never consulted: loading
        # them cost 26 ms of every pull from an insecure registry.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    d = cert_dir_for(host, cert_dir)
    if d is None:
        return ctx
    names = sorted(os.listdir(d))
    try:
        for n in names:
            p = os.path.join(d, n)
            if n.endswith(".crt"):
                ctx.load_verify_locations(cafile=p)
            elif n.endswith(".cert"):
                key = p[: -len(".cert")] + ".key"
                if not os.path.exists(key):
                    raise UsageError(f"{d}: client certificate {n} has no {os.path.basename(key)}")
                ctx.load_cert_chain(p, key)
        for n in names:
            if n.endswith(".key") and not os.path.exists(os.path.join(d, n[: -len(".key")] + ".cert")):
                raise UsageError(f"{d}: key {n} has no matching .cert")
    except (ssl.SSLError, OSError) as e:
        raise UsageError(f"{d}: cannot load certificates ({e.__class__.__name__}: {e})") from None
    return ctx


# WWW-Authenticate ------------------------------------------------------------

_PARAM = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_challenge(value: str) -> tuple[str, dict[str, str]]:
    """'Bearer realm="...",service="...",scope="a b"' -> ('bearer', {...})."""
    scheme, _, rest = value.strip().partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if not m or m.end() == pos:
            break
        params[m.group(1).lower()] = m.group(2).replace('\\"', '"') if m.group(2) is not None else m.group(3)
        pos = m.end()
    return scheme.lower(), params


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_detail(data: bytes) -> str:
    """The registry's error codes and messages ({"errors": [...]}), for messages."""
    import json

    try:
        errs = json.loads(data)["errors"]
        return "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errs if isinstance(e, dict))
    except (ValueError, KeyError, TypeError):
        return ""


@dataclass
class Token:
    value: str
    expires: float  # time.monotonic()

    def __repr__(self) -> str:
        return "Token(<hidden>)"


@dataclass
class Response:
    """A urllib3 response with the URL it came from (after redirects)."""

    raw: urllib3.BaseHTTPResponse
    url: str
    status: int = field(init=False)

    def __post_init__(self) -> None:
        self.status = self.raw.status

    @property
    def headers(self):
        return self.raw.headers

    def read(self, limit: int | None = None) -> bytes:
        """The whole body (at most limit bytes: more raises RegistryProtocolError)."""
        try:
            if limit is None:
                data = self.raw.read()
            else:
                data = self.raw.read(limit + 1)
                if len(data) > limit:
                    self.close()
                    raise RegistryProtocolError(f"{self.url}: answer larger than {limit} bytes")
        except (ProtocolError, _U3Timeout, SSLError, OSError) as e:
            self.close()
            raise RegistryUnreachable(f"{_host_of(self.url)}: connection failed while reading ({_why(e)})") from None
        self.release()
        return data

    def release(self) -> None:
        self.raw.release_conn()

    def close(self) -> None:
        """Drop the connection (a body left unread must not go back to the pool)."""
        self.raw.close()
        self.raw.release_conn()


def _host_of(url: str) -> str:
    return urlsplit(url).netloc


def _why(e: BaseException) -> str:
    """A short reason for a transport error, without URLs' query strings (presigned URLs carry secrets)."""
    while isinstance(e, MaxRetryError) and e.reason is not None:
        e = e.reason
    if isinstance(e, NameResolutionError):
        return "unknown host"
    s = str(e)
    if "Connection refused" in s:
        return "connection refused"
    if isinstance(e, (NewConnectionError,)):
        return s.split(": ", 1)[-1]
    if isinstance(e, _U3Timeout):
        return "timed out"
    s = re.sub(r"\?\S*", "?…", s)
    return s[:200]


class Client:
    """Requests to one registry (api host[:port]) with its credentials and TLS settings."""

    def __init__(self, host: str, creds: Credentials | None = None, tls_verify: bool = True,
                 cert_dir: str | None = None):
        self.host = host
        self.creds = creds
        self.tls_verify = tls_verify
        self.cert_dir = cert_dir
        self.scheme: str | None = None  # decided by the first request
        self._pools: dict[tuple[str, str], urllib3.PoolManager] = {}
        self._lock = threading.Lock()
        self._challenge: tuple[str, dict[str, str]] | None = None
        self._tokens: dict[frozenset[str], Token] = {}
        self.requests = 0  # counted for tests and figures
        if not tls_verify:
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

    def close(self) -> None:
        for p in self._pools.values():
            p.clear()

    def __repr__(self) -> str:
        return f"Client({self.host!r}, user={self.creds.username if self.creds else None!r})"

    # Connections ---------------------------------------------------------

    def _pool(self, scheme: str, host: str) -> urllib3.PoolManager:
        key = (scheme, host)
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                kw: dict[str, Any] = {}
                if scheme == "https":
                    # The registry's own cert dir applies to its host only; other hosts
                    # (blob storage, token servers) get their certs.d or the system's CAs.
                    ctx = ssl_context(host, self.tls_verify, self.cert_dir if host == self.host else None)
                    kw = {"ssl_context": ctx, "cert_reqs": "CERT_REQUIRED" if self.tls_verify else "CERT_NONE"}
                    if not self.tls_verify:
                        kw["assert_hostname"] = False
                pool = self._pools[key] = urllib3.PoolManager(
                    num_pools=8, maxsize=8, block=False, retries=False,
                    timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=READ_TIMEOUT), **kw)
            return pool

    def base(self) -> str:
        if self.scheme is None:
            self._decide_scheme()
        return f"{self.scheme}://{self.host}"

    def _decide_scheme(self) -> None:
        """https, or with tls_verify=False http when the host does not speak TLS."""
        try:
            r = self._raw("GET", f"https://{self.host}/v2/", {}, None, stream=False)
            self.scheme = "https"
            self._note_challenge(r)
            r.close()
            return
        except SSLError as e:
            if self.tls_verify:
                raise self._tls_error(e) from None
            why = e
        except (NewConnectionError, NameResolutionError, _U3Timeout, ProtocolError, MaxRetryError, OSError) as e:
            if self.tls_verify:
                raise self._unreachable(e) from None
            why = e
        try:
            r = self._raw("GET", f"http://{self.host}/v2/", {}, None, stream=False)
        except (_U3Error, OSError) as e:
            raise self._unreachable(e if not isinstance(why, SSLError) else why) from None
        self.scheme = "http"
        self._note_challenge(r)
        r.close()

    def _tls_error(self, e: BaseException) -> RegistryTLSError:
        why = _why(e)
        # An alert about a certificate comes from the registry: it wants a client
        # certificate, or refused the one sent (ours was never in question then).
        if "ALERT" in why.upper() and ("CERTIFICATE" in why.upper() or "UNKNOWN_CA" in why.upper()):
            d = cert_dir_for(self.host, self.cert_dir)
            sent = f"the client certificate from {d} was refused" if d and any(
                n.endswith(".cert") for n in os.listdir(d)) else "it requires a client certificate"
            return RegistryTLSError(
                f"{self.host}: TLS failed ({why}): {sent}; put one its CA signed (*.cert + *.key) in --cert-dir DIR"
                f" or {os.path.join('/etc/containers/certs.d', self.host)}")
        return RegistryTLSError(
            f"{self.host}: TLS failed ({_why(e)}); trust its CA with --cert-dir DIR (a *.crt file), "
            "or use --tls-verify=false")

    def _unreachable(self, e: BaseException) -> RegistryUnreachable:
        return RegistryUnreachable(f"cannot reach registry {self.host}: {_why(e)}")

    def _raw(self, method: str, url: str, headers: dict, body: Any, stream: bool) -> Response:
        s = urlsplit(url)
        self.requests += 1
        pool = self._pool(s.scheme, s.netloc)
        hdrs = {"User-Agent": USER_AGENT, **headers}
        r = pool.request(method, url, headers=hdrs, body=body, redirect=False, retries=False,
                         preload_content=False, decode_content=False,
                         chunked=body is not None and not isinstance(body, (bytes, str)) and "Content-Length" not in hdrs)
        return Response(r, url)

    def _note_challenge(self, r: Response) -> None:
        if r.status == 401 and r.headers.get("WWW-Authenticate"):
            with self._lock:
                self._challenge = parse_challenge(r.headers["WWW-Authenticate"])

    # Auth -----------------------------------------------------------------

    def _auth_header(self, scopes: frozenset[str], renew: bool = False) -> str | None:
        ch = self._challenge
        if ch is None:
            return None
        scheme, params = ch
        if scheme == "basic":
            return self.creds.basic() if self.creds is not None and self.creds.identity_token is None else None
        if scheme != "bearer":
            raise RegistryProtocolError(f"{self.host}: unsupported authentication scheme {scheme!r}")
        with self._lock:
            tok = self._tokens.get(scopes)
            if tok is not None and not renew and tok.expires - TOKEN_MARGIN > time.monotonic():
                return "Bearer " + tok.value
        tok = self._fetch_token(params, scopes)
        with self._lock:
            self._tokens[scopes] = tok
        return "Bearer " + tok.value

    def _fetch_token(self, params: dict[str, str], scopes: frozenset[str]) -> Token:
        import json

        realm = params.get("realm")
        if not realm or urlsplit(realm).scheme not in ("http", "https"):
            raise RegistryProtocolError(f"{self.host}: Bearer challenge without a usable realm")
        if urlsplit(realm).scheme == "http" and self.tls_verify and self.scheme == "https":
            raise RegistryTLSError(f"{self.host}: token server {_host_of(realm)} is plain HTTP; "
                                   "use --tls-verify=false to allow it")
        q: list[tuple[str, str]] = []
        if params.get("service"):
            q.append(("service", params["service"]))
        headers: dict[str, str] = {}
        token = self.creds.identity_token if self.creds else None
        if token is not None:
            # OAuth2: the identity token is a refresh token (distribution docs/spec/auth/oauth.md),
            # and the form's scope is one space-separated field, as docker sends it.
            if scopes:
                q.append(("scope", " ".join(sorted(scopes))))
            form = urlencode([("grant_type", "refresh_token"), ("refresh_token", token), ("client_id", "layerdb"),
                              *q])
            method, url, body = "POST", realm, form.encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        else:
            q += [("scope", s) for s in sorted(scopes)]
            if self.creds is not None:
                headers["Authorization"] = self.creds.basic()
            sep = "&" if "?" in realm else "?"
            method, url, body = "GET", realm + (sep + urlencode(q) if q else ""), None
        r = self._send(method, url, headers, lambda: body, stream=False)
        data = r.read(MAX_TOKEN_RESPONSE)
        if r.status in (401, 403):
            raise RegistryAuthError(f"{self.host}: the token server refused {self.who()} ({r.status})")
        if r.status != 200:
            raise RegistryAuthError(f"{self.host}: the token server answered {r.status} {error_detail(data)}".strip())
        try:
            doc = json.loads(data)
            value = doc.get("token") or doc.get("access_token")
            ttl = float(doc.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            raise RegistryProtocolError(f"{self.host}: the token server's answer is not a token") from None
        if not isinstance(value, str) or not value:
            raise RegistryProtocolError(f"{self.host}: the token server's answer has no token")
        log.debug("token", registry=self.host, scopes=sorted(scopes), expires_in=ttl)
        return Token(value, time.monotonic() + ttl)

    def who(self) -> str:
        if self.creds is None:
            return "anonymous access"
        if self.creds.identity_token is not None:
            return f"the identity token from {self.creds.source}"
        return f"user {self.creds.username!r}"

    # Requests -----------------------------------------------------------

    def request(self, method: str, path: str, *, scopes: Iterable[str] = (), headers: dict | None = None,
                body: Callable[[], Any] | bytes | None = None, stream: bool = False,
                ok: tuple[int, ...] = (200,), what: str = "") -> Response:
        """A request to the registry with auth, redirects and retries.

        path is '/v2/...' or an absolute URL (an upload Location).  body is bytes
        or a callable that gives a fresh body for every attempt.  An answer whose
        status is not in ok raises the error it means; ok=() returns any answer.
        """
        url = path if "://" in path else self.base() + path
        scopes = frozenset(scopes)
        make_body = body if callable(body) else (lambda: body)
        attempt = 0
        renewed = False  # one new credential per request: after the first 401
        renew = False
        while True:
            hdrs = dict(headers or {})
            auth = self._auth_header(scopes, renew=renew)
            renew = False
            if auth:
                hdrs["Authorization"] = auth
            try:
                r = self._send(method, url, hdrs, make_body, stream=stream)
            except (NewConnectionError, NameResolutionError, _U3Timeout, ProtocolError, MaxRetryError,
                    ConnectionError) as e:
                if attempt < RETRIES and not isinstance(e, NameResolutionError):
                    self._sleep(attempt, None, f"{method} {what or path}: {_why(e)}")
                    attempt += 1
                    continue
                raise self._unreachable(e) from None
            except SSLError as e:
                raise self._tls_error(e) from None
            if r.status == 401:
                self._note_challenge(r)
                r.close()
                # The first 401 says which scheme, realm and scopes; a token may
                # also have expired mid-transfer: one more try with a new one.
                ch = self._challenge
                if not renewed and ch is not None:
                    renewed = renew = True
                    if ch[0] == "bearer" and ch[1].get("scope"):
                        scopes = scopes | frozenset(ch[1]["scope"].split())
                    if ch[0] == "basic" and self.creds is None:
                        raise RegistryAuthError(
                            f"{self.host}: authentication required; log in with `layerdb login {self.host}`"
                            " or pass --creds")
                    continue
                raise RegistryAuthError(f"{self.host}: {self.who()} was refused for {what or path} (401)")
            if r.status in RETRY_STATUS and attempt < RETRIES:
                wait = _retry_after(r.headers.get("Retry-After"))
                r.close()
                self._sleep(attempt, wait, f"{method} {what or path}: {r.status}")
                attempt += 1
                continue
            if ok and r.status not in ok:
                raise self._status_error(r, what or path)
            return r

    def _sleep(self, attempt: int, retry_after: float | None, why: str) -> None:
        wait = BACKOFF * (2 ** attempt)
        if retry_after is not None:
            wait = max(min(retry_after, MAX_WAIT), 0.0)
        log.info("retry", registry=self.host, reason=why, wait=round(wait, 2), attempt=attempt + 1)
        time.sleep(wait)

    def _status_error(self, r: Response, what: str) -> RegistryError:
        data = b""
        try:
            data = r.read(1 << 16)
        except RegistryError:
            pass
        detail = error_detail(data)
        tail = f": {detail}" if detail else ""
        if r.status == 403:
            return RegistryAuthError(f"{self.host}: {self.who()} is denied {what} (403){tail}")
        if r.status == 404:
            return RegistryNotFound(f"{self.host}: {what}: not found{tail}")
        if r.status == 429:
            return RegistryRateLimited(f"{self.host}: too many requests (429) after {RETRIES} retries{tail}")
        return RegistryError(f"{self.host}: {what}: the registry answered {r.status}{tail}")

    def _send(self, method: str, url: str, headers: dict, make_body: Callable[[], Any], stream: bool) -> Response:
        """One request, following redirects; Authorization never leaves the first host."""
        first_host = _host_of(url)
        seen = 0
        while True:
            r = self._raw(method, url, headers, make_body(), stream)
            if r.status not in (301, 302, 303, 307, 308) or "Location" not in r.headers:
                return r
            r.close()
            seen += 1
            if seen > MAX_REDIRECTS:
                raise RegistryProtocolError(f"{self.host}: more than {MAX_REDIRECTS} redirects")
            url = urljoin(url, r.headers["Location"])
            if urlsplit(url).scheme not in ("http", "https"):
                raise RegistryProtocolError(f"{self.host}: redirect to an unsupported URL scheme")
            if _host_of(url) != first_host:
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            if r.status == 303 or (r.status in (301, 302) and method == "POST"):
                method, make_body = "GET", (lambda: None)
            log.debug("redirect", registry=self.host, status=r.status, to=_host_of(url))
