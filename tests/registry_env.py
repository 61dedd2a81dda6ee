"""Real registries for the registry tests: CNCF distribution 2.8 (Debian's docker-registry),
a token server, and a fault-injecting proxy.  Nothing here is mocked: the proxy
forwards to a real registry and only changes what a test asks it to.

The binary is `docker-registry` on PATH, else /opt/docker-registry/usr/bin/docker-registry
(`apt-get download docker-registry && dpkg-deb -x docker-registry_*.deb /opt/docker-registry`).
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from conftest import REPO_FIXTURES

USER, PASSWORD = "alice", "s3cret"
REFRESH_TOKEN = "rt-alice-0123456789"  # an OAuth2 refresh token (auth.json "identitytoken")
SERVICE = "layerdb-test-registry"
ISSUER = "layerdb-test-issuer"


def registry_binary() -> str | None:
    found = shutil.which("docker-registry")
    if found:
        return found
    p = "/opt/docker-registry/usr/bin/docker-registry"
    return p if os.access(p, os.X_OK) else None


# What the registry test modules share: their skip marks, the fixtures' archives and oracles.
NEEDS = [
    pytest.mark.skipif(registry_binary() is None, reason="docker-registry is not installed (see tests/registry_env.py)"),
    pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed"),
]
SAMPLE = REPO_FIXTURES / "images" / "sample.oci.tar"
SAMPLE2 = REPO_FIXTURES / "images" / "sample2.oci.tar"
SAMPLE_DOCKER = REPO_FIXTURES / "images" / "sample.docker.tar"
OPAQUE = REPO_FIXTURES / "images" / "opaque.oci.tar"
MULTI = REPO_FIXTURES / "multiplatform" / "multi.oci.tar"
ORACLE = {n: json.loads((REPO_FIXTURES / "oracle" / n / "index.json").read_text()) for n in ("sample", "sample2", "opaque")}
INSECURE = ("--tls-verify=false",)


@pytest.fixture(scope="session")
def regs():
    """The shared registries (env()): import this fixture into a test module."""
    return env()


# Certificates and keys ----------------------------------------------------------


def self_signed(dirpath: Path, cn: str = "localhost") -> tuple[Path, Path, bytes]:
    """A self-signed certificate for localhost and 127.0.0.1: (cert.pem, key.pem, DER)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    dirpath.mkdir(parents=True, exist_ok=True)
    cp, kp = dirpath / "cert.pem", dirpath / "key.pem"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                     serialization.NoEncryption()))
    return cp, kp, cert.public_bytes(serialization.Encoding.DER)


def client_certificate(dirpath: Path, cn: str = "layerdb-test-client") -> tuple[Path, Path, Path]:
    """A CA and a client certificate it signed: (ca.pem, client.cert, client.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "layerdb-test-client-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    dirpath.mkdir(parents=True, exist_ok=True)
    cap, cp, kp = dirpath / "ca.pem", dirpath / "client.cert", dirpath / "client.key"
    cap.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                     serialization.NoEncryption()))
    return cap, cp, kp


def htpasswd(path: Path, users: dict[str, str]) -> Path:
    import bcrypt

    path.write_text("".join(
        f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4, prefix=b'2a')).decode()}\n" for u, p in users.items()))
    return path


# The registry --------------------------------------------------------------------


@dataclass
class Registry:
    proc: subprocess.Popen
    host: str  # 127.0.0.1:PORT
    root: Path
    access_log: Path
    tls: bool = False
    ca: Path | None = None  # a --cert-dir trusting a TLS registry's certificate
    token: "TokenServer | None" = None

    def access(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request so far, from the registry's own access log."""
        out = []
        for line in self.access_log.read_text(errors="replace").splitlines():
            m = re.search(r'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d+)', line)
            if m:
                out.append((m.group(1), m.group(2), int(m.group(3))))
        return out

    def mark(self) -> int:
        return len(self.access())

    def since(self, mark: int) -> list[tuple[str, str, int]]:
        return self.access()[mark:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_registry(workdir: Path, *, tls: bool = False, users: dict[str, str] | None = None,
                   token: "TokenServer | None" = None, client_cas: list[Path] | None = None) -> Registry:
    """client_cas (with tls): the registry requires a client certificate one of them signed."""
    binary = registry_binary()
    assert binary, "docker-registry not found"
    workdir.mkdir(parents=True, exist_ok=True)
    cfg: dict = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(workdir / "data")}, "delete": {"enabled": True},
                    "maintenance": {"uploadpurging": {"enabled": False}}},
        "http": {"addr": "127.0.0.1:0", "secret": uuid.uuid4().hex},
    }
    ca = None
    if tls:
        cert, key, _ = self_signed(workdir / "tls")
        cfg["http"]["tls"] = {"certificate": str(cert), "key": str(key)}
        if client_cas:
            cfg["http"]["tls"]["clientcas"] = [str(p) for p in client_cas]
        ca = workdir / "ca"  # a --cert-dir: the CA as *.crt
        ca.mkdir()
        shutil.copy(cert, ca / "ca.crt")
    if users:
        cfg["auth"] = {"htpasswd": {"realm": "layerdb-test", "path": str(htpasswd(workdir / "htpasswd", users))}}
    if token:
        cfg["auth"] = {"token": {"realm": token.url + "/token", "service": SERVICE, "issuer": ISSUER,
                                 "rootcertbundle": str(token.cert)}}
    conf = workdir / "config.yml"
    conf.write_text(json.dumps(cfg))  # YAML is a superset of JSON
    out, err = workdir / "access.log", workdir / "registry.log"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen([binary, "serve", str(conf)], stdout=fo, stderr=fe, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while True:
        m = re.search(r"listening on (127\.0\.0\.1:\d+)", err.read_text(errors="replace"))
        if m:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"docker-registry did not start: {err.read_text()[-2000:]}")
        time.sleep(0.02)
    return Registry(proc, m.group(1), workdir, out, tls, ca, token)


class _QuietServer(http.server.ThreadingHTTPServer):
    """Clients that hang up (a pull cut short on purpose) are no error worth a traceback on stderr."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        pass


# Token server --------------------------------------------------------------------


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


class TokenServer:
    """distribution's token auth: GET /token?service=&scope=..., RS256 JWTs.

    alice/s3cret gets what she asks for; anonymous gets pull only; a wrong
    password gets 401.  `ttl` sets expires_in (and exp) of the next tokens.
    POST /token is the OAuth2 form (distribution docs/spec/auth/oauth.md):
    grant_type=refresh_token with REFRESH_TOKEN gets alice's grant.
    """

    def __init__(self, workdir: Path):
        from cryptography.hazmat.primitives import serialization

        self.cert, keyp, self.der = self_signed(workdir / "token", cn="layerdb-test-token")
        self.key = serialization.load_pem_private_key(keyp.read_bytes(), None)
        self.ttl = 300
        self.expired_next = 0  # this many next tokens are already expired (for the registry, not the client)
        # This many next tokens the registry refuses `short_life` seconds after they are issued,
        # while expires_in still says ttl: a token that runs out during a transfer.
        self.short_next = 0
        self.short_life = 0.0
        self.requests: list[dict] = []
        srv = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                u = urlsplit(self.path)
                q = parse_qs(u.query)
                user = None
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    u_, _, p_ = base64.b64decode(auth[6:]).decode().partition(":")
                    if (u_, p_) != (USER, PASSWORD):
                        srv.requests.append({"user": u_, "denied": True, "scopes": q.get("scope", [])})
                        self.send_response(401)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    user = u_
                scopes = [s for sc in q.get("scope", []) for s in sc.split(" ")]
                srv.requests.append({"user": user, "scopes": scopes, "ttl": srv.ttl})
                self._grant(user, scopes, "token")

            def do_POST(self):
                form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode())
                one = {k: v[0] for k, v in form.items() if len(v) == 1}
                scopes = [s for sc in form.get("scope", []) for s in sc.split(" ")]
                ok = one.get("grant_type") == "refresh_token" and one.get("refresh_token") == REFRESH_TOKEN
                srv.requests.append({"user": USER if ok else None, "scopes": scopes, "grant": one.get("grant_type"),
                                     "client_id": one.get("client_id"), "service": one.get("service"),
                                     "denied": not ok, "scope_fields": len(form.get("scope", []))})
                if not ok:
                    body = json.dumps({"error": "invalid_grant"}).encode()
                    self.send_response(401)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self._grant(USER, scopes, "access_token")

            def _grant(self, user, scopes, key):
                body = json.dumps({key: srv.sign(user, scopes), "expires_in": srv.ttl,
                                   "issued_at": dt.datetime.now(dt.timezone.utc).isoformat()}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = _QuietServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def sign(self, user: str | None, scopes: list[str]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        access = []
        for s in scopes:
            parts = s.split(":")
            if len(parts) < 3:
                continue
            typ, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1].split(",")
            allowed = [a for a in actions if user is not None or a == "pull"]
            access.append({"type": typ, "name": name, "actions": allowed})
        now = int(time.time())
        exp = now + self.ttl
        if self.expired_next > 0:
            self.expired_next -= 1
            exp = now - 120  # distribution allows 60 s of leeway
        elif self.short_next > 0:
            self.short_next -= 1
            exp = now + int(self.short_life) - 60
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self.der).decode()]}
        claims = {"iss": ISSUER, "sub": user or "", "aud": SERVICE, "exp": exp, "nbf": now - 300,
                  "iat": now, "jti": uuid.uuid4().hex, "access": access}
        signing = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
        sig = self.key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing + "." + _b64(sig)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# Fault-injecting proxy ---------------------------------------------------------------


@dataclass
class Fault:
    """One misbehaviour: the proxy applies it to the requests `match` accepts, `times` times."""

    kind: str  # drop (after `at` bytes of the body), 429, 503, corrupt, endless, loop, ignore-range,
    #            reject-put, slow (sleeps `delay` s per 64 KiB), schema1 (Accept: schema1 only), big (a 5 MiB body),
    #            offsite (a 307 to the same path on host `to`, as blob storage answers)
    match: str = "/blobs/sha256:"
    method: str = "GET"
    times: int = 1
    at: int = 1000
    retry_after: str = "1"
    delay: float = 0.05
    to: str = ""  # offsite: the host[:port] to redirect to
    stall: float = 0.0  # drop: seconds the connection hangs after `at` bytes before it is cut
    hits: int = 0


class FaultProxy:
    """An HTTP proxy in front of a plain-HTTP registry (http://127.0.0.1:PORT/...)."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, int, str]] = []  # method, path, status, what the proxy did
        self.authorized: list[tuple[str, bool]] = []  # path, whether the request carried Authorization
        proxy = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _fault(self) -> Fault | None:
                for f in proxy.faults:
                    if f.hits < f.times and f.method == self.command and f.match in self.path:
                        f.hits += 1
                        return f
                return None

            def _simple(self, status, headers=(), body=b""):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self):
                proxy.authorized.append((self.path, "Authorization" in self.headers))
                f = self._fault()
                kind = f.kind if f else "pass"
                if kind in ("429", "503"):
                    proxy.log.append((self.command, self.path, int(kind), kind))
                    self._drain_request()
                    return self._simple(int(kind), [("Retry-After", f.retry_after)])
                if kind == "offsite":
                    proxy.log.append((self.command, self.path, 307, kind))
                    return self._simple(307, [("Location", f"http://{f.to}{self.path}")])
                if kind == "loop":
                    proxy.log.append((self.command, self.path, 302, kind))
                    return self._simple(302, [("Location", self.path)])
                if kind == "reject-put" and self.headers.get("Content-Length", "0") != "0":
                    proxy.log.append((self.command, self.path, 413, kind))
                    self._drain_request()
                    self.close_connection = True
                    return self._simple(413, [("Connection", "close")])
                length = int(self.headers.get("Content-Length") or 0)
                chunked = "chunked" in self.headers.get("Transfer-Encoding", "")
                body = self._read_chunked() if chunked else (self.rfile.read(length) if length else None)
                headers: dict[str, str] = {}
                for k in dict.fromkeys(self.headers.keys()):  # repeated headers (Accept) joined, not dropped
                    if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                        headers[k] = ", ".join(self.headers.get_all(k))
                if kind == "ignore-range":
                    headers.pop("Range", None)
                if kind == "schema1":
                    headers["Accept"] = "application/vnd.docker.distribution.manifest.v1+prettyjws"
                if kind == "big":
                    proxy.log.append((self.command, self.path, 200, kind))
                    return self._simple(200, [("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
                                        b" " * (5 << 20))
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                conn.request(self.command, self.path, body=body, headers=headers)
                r = conn.getresponse()
                proxy.log.append((self.command, self.path, r.status, kind))
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() in ("connection", "transfer-encoding", "content-length"):
                        continue
                    if kind == "endless":
                        continue
                    self.send_header(k, v)
                n = r.getheader("Content-Length")
                if kind == "endless":
                    # No length, then never-ending bytes after the real body.
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.close_connection = True
                    try:
                        self.wfile.write(r.read())
                        while True:
                            self.wfile.write(b"\0" * 65536)
                    except OSError:
                        pass
                    conn.close()
                    return
                if n is not None:
                    self.send_header("Content-Length", n)
                self.end_headers()
                if self.command == "HEAD":
                    conn.close()
                    return
                sent = 0
                while True:
                    b = r.read(65536)
                    if not b:
                        break
                    if kind == "corrupt" and sent <= f.at < sent + len(b):
                        i = f.at - sent
                        b = b[:i] + bytes([b[i] ^ 0xFF]) + b[i + 1:]
                    if kind == "drop" and sent + len(b) > f.at:
                        self.wfile.write(b[: f.at - sent])
                        self.wfile.flush()
                        time.sleep(f.stall)
                        self.close_connection = True
                        try:
                            self.connection.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                        conn.close()
                        return
                    self.wfile.write(b)
                    sent += len(b)
                    if kind == "slow":
                        self.wfile.flush()
                        time.sleep(f.delay)
                conn.close()

            def _drain_request(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                elif "chunked" in self.headers.get("Transfer-Encoding", ""):
                    self._read_chunked()

            def _read_chunked(self) -> bytes:
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _handle

        self.httpd = _QuietServer(("127.0.0.1", 0), H)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add(self, *faults: Fault) -> None:
        self.faults = list(faults)

    def clear(self) -> None:
        self.faults = []
        self.log = []
        self.authorized = []

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def skopeo_copy(src: str, dest: str, *args: str) -> None:
    p = subprocess.run(["skopeo", "copy", "-q", *args, src, dest], capture_output=True, timeout=120)
    if p.returncode:
        raise AssertionError(f"skopeo copy {src} {dest} failed: {p.stderr.decode(errors='replace')}")


# One set of servers per test process ---------------------------------------------

_ENV: dict = {}


def env() -> dict:
    """The registries, started on first use and stopped at exit: plain HTTP, TLS + htpasswd,
    token auth (HTTP), and a fault proxy in front of the plain one."""
    if _ENV:
        return _ENV
    import atexit
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="layerdb-registries-"))
    plain = start_registry(root / "plain")
    tls = start_registry(root / "tls", tls=True, users={USER: PASSWORD})
    tokens = TokenServer(root)
    token = start_registry(root / "token", token=tokens)
    proxy = FaultProxy(plain.host)

    def stop():
        for r in (plain, tls, token):
            r.stop()
        tokens.stop()
        proxy.stop()
        shutil.rmtree(root, ignore_errors=True)

    atexit.register(stop)
    _ENV.update(root=root, plain=plain, tls=tls, token=token, tokens=tokens, proxy=proxy)
    return _ENV


_PUSHED: set = set()


def seed(reg: Registry, src: str, dest: str, *extra: str) -> str:
    """skopeo copy src (an archive ref) to reg's dest repo:tag, once per process; returns HOST/dest."""
    key = (reg.host, src, dest)
    if key not in _PUSHED:
        args = ["--dest-tls-verify=false"]
        if reg.tls:
            args = ["--dest-cert-dir", str(reg.ca), "--dest-creds", f"{USER}:{PASSWORD}"]
        elif reg.token is not None:
            args += ["--dest-creds", f"{USER}:{PASSWORD}"]
        skopeo_copy(src, f"docker://{reg.host}/{dest}", *args, *extra)
        _PUSHED.add(key)
    return f"{reg.host}/{dest}"
