#!/usr/bin/env python3
"""Build and cache the benchmark images (run as root: debootstrap, chroot, mounts).

    python3 bench/images.py            # build everything missing (~10 min the first time)
    python3 bench/images.py --list     # what exists, with sizes
    python3 bench/images.py --only chain   # one group: debian, chain, bigfile, smallfiles, manyfiles

Everything lives under $LAYERDB_BENCH_DIR (default /var/tmp/layerdb-bench):

    debootstrap/         pristine `debootstrap --variant=minbase bookworm`
    stages/NAME/         the root filesystem after each build step (NAME.done when complete)
    layers/NAME.tar.gz   that step's layer: the diff of the stage against its parent stage
    layers/NAME.json     diff_id, digest, sizes, created_by
    images/SLUG.oci.tar  OCI image-layout archive, gzip layers (our own writer, checked by skopeo)
    images/SLUG.docker.tar   the same image as `docker save` (skopeo copy; uncompressed layers)
    images/family.oci.tar    the five related Debian images in one archive, shared blobs once
    unpacked/SLUG/       `umoci unpack` of the image (the peers' tree on disk)

How a layer is made: a stage starts as a `cp -a` of its parent stage, a step
changes it (a chroot `apt-get install`, or Python writing files), and the layer
is the difference of the two trees, the way overlay2 or buildah compute it:
every new or changed entry (metadata, or bytes compared in full), with its
parent directories, and an OCI whiteout (`.wh.NAME`) for every deleted path,
or an opaque marker when a directory lost all its lower children.  Hard links
inside one layer are written as tar hard links.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import MiB, cache_dir, log, mounted_below, rmtree  # noqa: E402

MIRROR = os.environ.get("LAYERDB_BENCH_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
CREATED = "2024-01-01T00:00:00Z"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# Stages: a root filesystem after one build step ------------------------------


@dataclass
class Stage:
    name: str
    parent: str | None  # None: built from nothing (its layer is the whole tree)
    created_by: str  # the history line, as a Dockerfile step would read
    shell: str | None = None  # run in a chroot of the stage
    py: Callable[[Path], None] | None = None  # or: change the tree from Python
    group: str = "debian"
    py_first: bool = False  # run `py` before `shell` (a COPY the RUN needs)


def _write(root: Path, rel: str, data: bytes | str, mode: int = 0o644) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    p.write_bytes(data)
    os.chmod(p, mode)


WORDS = ("def class return import from self None True False for in if else elif while try except with as "
         "value result config request response handler session user item data path name index count "
         "logger error status cache timeout retry = == ( ) : , . [ ] { } + - * / # 0 1 2 10 100").split()


def _text(rng: random.Random, size: int, words=WORDS, indents=(0, 4, 8, 12), most=12, eol="") -> str:
    """Code-like text: compresses like source code does (about 4:1 with zstd)."""
    out, n = [], 0
    while n < size:
        line = " " * rng.choice(indents) + " ".join(rng.choice(words) for _ in range(rng.randint(2, most))) + eol
        out.append(line)
        n += len(line) + 1
    return "\n".join(out)[:size] + "\n"


def _sources(root: Path, version: int, seed: int, count: int, mu: float, text, path, changed: int, extra: int,
             head=lambda i: "", tail: str = "") -> None:
    """`count` source files of lognormal sizes; from version 2 on, every tenth
    (those at `changed` mod 10) gets `extra` bytes more."""
    rng = random.Random(seed)
    for i in range(count):
        body = head(i) + text(rng, int(rng.lognormvariate(mu, 0.8))) + tail
        if version > 1 and i % 10 == changed:
            body += f"# changed in version {version}\n" + text(random.Random(version * seed + i), extra)
        _write(root, path(i), body)


def _app(version: int) -> Callable[[Path], None]:
    """A Python application of ~300 files; version 2 changes a tenth of them."""

    def make(root: Path) -> None:
        _sources(root, version, 1000, 300, 8.3, _text, lambda i: f"app/src/pkg{i // 30}/mod{i}.py", 3, 500)
        _write(root, "app/VERSION", f"{version}.0.0\n")
        _write(root, "app/main.py", f"from pkg0 import mod0\nVERSION = {version}\n", 0o755)
        _write(root, "app/static/logo.bin", random.Random(7).randbytes(200_000))

    return make


def _cfg(version: int, rel: str = "etc/app/app.conf",
         body: str = "[server]\nport = 8080\nworkers = {w2}\nlog = /var/log/app\n") -> Callable[[Path], None]:
    def make(root: Path) -> None:
        _write(root, rel, body.format(w2=version * 2, w3=version * 3))
        (root / "var/log/app").mkdir(parents=True, exist_ok=True)

    return make


def _site(version: int, default_page: str = "index.html") -> Callable[[Path], None]:
    def make(root: Path) -> None:
        rng = random.Random(2000)
        os.unlink(root / "var/www/html" / default_page)
        for i in range(120):
            body = "<html><body>\n" + _text(rng, int(rng.lognormvariate(8.0, 0.7))) + "</body></html>\n"
            if version > 1 and i % 5 == 0:
                body = body.replace("value", f"value{version}")
            _write(root, f"var/www/html/page{i}.html", body)
        for i in range(10):
            seed = i + 10 if version > 1 and i < 2 else i  # v2 replaces two photos
            _write(root, f"var/www/html/img/photo{i}.jpg", random.Random(seed).randbytes(60_000))

    return make


PERL_WORDS = ("my our sub return use package shift bless undef if elsif else unless foreach while last next "
              "$self $args $value $result $config $request %opts @list = == ( ) { } ; , -> => . eq ne 0 1 2 10").split()


def _perl_text(rng: random.Random, size: int) -> str:
    """Perl-like text, a vocabulary other than _text's (the second family's own content)."""
    return _text(rng, size, PERL_WORDS, (0, 4, 8), 10, ";")


def _plapp(version: int) -> Callable[[Path], None]:
    """A Perl application of ~250 modules; version 2 changes a tenth of them."""

    def make(root: Path) -> None:
        _sources(root, version, 3000, 250, 8.2, _perl_text, lambda i: f"opt/app/lib/App/G{i // 25}/M{i}.pm", 7, 400,
                 head=lambda i: f"package App::M{i};\n", tail="1;\n")
        _write(root, "opt/app/VERSION", f"{version}.1\n")
        _write(root, "opt/app/bin/app.pl", f"#!/usr/bin/perl\nuse lib '/opt/app/lib';\nour $VERSION = {version};\n", 0o755)
        _write(root, "opt/app/share/data.bin", random.Random(9).randbytes(150_000))

    return make


def _plcfg(version: int) -> Callable[[Path], None]:
    return _cfg(version, "etc/app/app.yml", "listen: 0.0.0.0:9000\nworkers: {w3}\nlog: /var/log/app\n")


def _fcgi(root: Path) -> None:
    _write(root, "etc/nginx/sites-available/app", "server {\n  listen 80;\n  location / { fastcgi_pass 127.0.0.1:9000; }\n}\n")
    _write(root, "opt/app/app.fcgi", "#!/usr/bin/perl\nuse FCGI;\nmy $r = FCGI::Request();\n", 0o755)


def _wsgi(root: Path) -> None:
    _write(root, "etc/apache2/sites-available/app.conf",
           "<VirtualHost *:80>\n  WSGIScriptAlias / /app/wsgi.py\n</VirtualHost>\n")
    _write(root, "app/wsgi.py", "def application(env, start):\n    start('200 OK', [])\n    return [b'ok']\n")


def _small_base(root: Path) -> None:
    """A tiny base (like busybox or distroless static): a few dirs and text files."""
    for d in ("bin", "etc", "tmp", "var/log", "usr/share/doc", "root", "home"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    _write(root, "etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    _write(root, "etc/group", "root:x:0:\nnogroup:x:65534:\n")
    _write(root, "etc/os-release", 'NAME="bench"\nID=bench\nVERSION_ID=1\n')
    _write(root, "etc/hostname", "bench\n")
    rng = random.Random(5)
    for i in range(40):
        _write(root, f"usr/share/doc/pkg{i}/copyright", _text(rng, 1500))
    _write(root, "bin/tool", random.Random(6).randbytes(300_000), 0o755)


def _big(root: Path) -> None:
    """150 MiB of pseudo-random bytes (incompressible, like media or model weights)."""
    rng = random.Random(150)
    (root / "data").mkdir(exist_ok=True)
    with open(root / "data/big.bin", "wb") as f:
        for _ in range(150):
            f.write(rng.randbytes(MiB))


BIG_EDIT_AT = 75 * MiB + 12345  # in the middle, not on a 1 MiB boundary


def _big_edit(root: Path) -> None:
    """Rewrite 1 MiB in the middle of the big file, in place (as a database or VM disk would)."""
    with open(root / "data/big.bin", "r+b") as f:
        f.seek(BIG_EDIT_AT)
        f.write(random.Random(151).randbytes(MiB))


def _small_files(root: Path) -> None:
    """About 20k small files, like node_modules or site-packages: many licences repeat."""
    rng = random.Random(20_000)
    licences = [_text(random.Random(50 + i), 1100) for i in range(5)]
    n = 0
    pkg = 0
    while n < 20_000:
        base = f"app/node_modules/pkg{pkg:04d}"
        _write(root, f"{base}/LICENSE", licences[pkg % len(licences)])
        _write(root, f"{base}/package.json", f'{{"name": "pkg{pkg}", "version": "1.{pkg % 7}.0"}}\n')
        n += 2
        for j in range(rng.randint(4, 30)):
            sub = "lib" if j % 3 else "dist"
            _write(root, f"{base}/{sub}/f{j}.js", _text(rng, int(rng.lognormvariate(7.2, 1.0))))
            n += 1
        pkg += 1


MANY_FILES = 200_000


def _many_files(root: Path) -> None:
    """200k tiny files (a few hundred bytes, like a big monorepo's node_modules):
    the image whose file count, not byte count, is large."""
    rng = random.Random(200_000)
    for i in range(MANY_FILES):
        _write(root, f"srv/mono/pkg{i // 100:04d}/m{(i // 10) % 10}/f{i}.js", _text(rng, int(rng.lognormvariate(5.0, 0.8))))


CHAIN_LAYERS = 100
CHAIN_HOT = "etc/app/state.conf"  # modified in every layer of the chain


def _chain_base(root: Path) -> None:
    _small_base(root)
    _write(root, CHAIN_HOT, "generation = 1\n")
    rng = random.Random(77)
    for i in range(200):
        _write(root, f"usr/lib/app/lib{i // 20}/m{i}.py", _text(rng, 800))


def _chain_step(n: int) -> Callable[[Path], None]:
    """Layer n of the chain: a few files changed, added, sometimes deleted or a dir replaced."""

    def make(root: Path) -> None:
        rng = random.Random(n)
        _write(root, CHAIN_HOT, f"generation = {n}\n" + "x" * n + "\n")
        _write(root, f"app/layer{n:03d}/notes.txt", _text(rng, 600))
        for _ in range(3):
            i = rng.randrange(200)
            p = root / f"usr/lib/app/lib{i // 20}/m{i}.py"
            if p.exists():
                p.write_text(_text(rng, 900))
        if n % 10 == 0:  # a delete: a whiteout of an earlier layer's directory
            rmtree(root / f"app/layer{n - 5:03d}")
        if n % 25 == 0:  # a directory emptied and refilled: an opaque marker
            d = root / f"usr/lib/app/lib{n // 25}"
            for c in list(d.iterdir()):
                c.unlink()
            _write(root, f"usr/lib/app/lib{n // 25}/fresh{n}.py", _text(rng, 400))
        if n % 7 == 0:  # a hard link beside its target, both new in this layer
            _write(root, f"app/layer{n:03d}/bin", rng.randbytes(2000), 0o755)
            os.link(root / f"app/layer{n:03d}/bin", root / f"app/layer{n:03d}/bin-alias")

    return make


APT = "export DEBIAN_FRONTEND=noninteractive; "
STAGES: dict[str, Stage] = {}


def _stage(s: Stage) -> None:
    STAGES[s.name] = s


_stage(Stage("base", None, f"debootstrap --variant=minbase {SUITE} / {MIRROR}"))
_stage(Stage("py", "base", "RUN apt-get update && apt-get install -y python3",
             shell=APT + "apt-get update -q && apt-get install -y -q python3"))
_stage(Stage("app1", "py", "RUN apt-get install -y python3-yaml python3-requests && COPY app /app",
             shell=APT + "apt-get install -y -q --no-install-recommends python3-yaml python3-requests",
             py=_app(1)))
_stage(Stage("cfg1", "app1", "RUN useradd -r -u 999 app && COPY app.conf /etc/app/",
             shell="useradd -r -u 999 -d /app app", py=_cfg(1)))
_stage(Stage("app2", "py", "RUN apt-get install -y python3-yaml python3-requests && COPY app /app  # v2",
             shell=APT + "apt-get install -y -q --no-install-recommends python3-yaml python3-requests",
             py=_app(2)))
_stage(Stage("cfg2", "app2", "RUN useradd -r -u 999 app && COPY app.conf /etc/app/  # v2",
             shell="useradd -r -u 999 -d /app app", py=_cfg(2)))
_stage(Stage("apache", "base", "RUN apt-get update && apt-get install -y apache2",
             shell=APT + "apt-get update -q && apt-get install -y -q apache2"))
_stage(Stage("site1", "apache", "RUN a2enmod rewrite headers && COPY site /var/www/html",
             shell="a2enmod -q rewrite headers", py=_site(1)))
_stage(Stage("site2", "apache", "RUN a2enmod rewrite headers && COPY site /var/www/html  # v2",
             shell="a2enmod -q rewrite headers", py=_site(2)))
_stage(Stage("apache_py", "py", "RUN apt-get install -y apache2 libapache2-mod-wsgi-py3",
             shell=APT + "apt-get install -y -q apache2 libapache2-mod-wsgi-py3"))
_stage(Stage("cfg3", "apache_py", "COPY app.conf wsgi.py && RUN a2ensite app && a2dissite 000-default",
             shell="a2ensite -q app && a2dissite -q 000-default", py=_wsgi, py_first=True))

# The second family: the same kind of images (a language runtime and an app, a web
# server and a site, both together) from other packages: perl and nginx.
_stage(Stage("perl", "base", "RUN apt-get update && apt-get install -y perl",
             shell=APT + "apt-get update -q && apt-get install -y -q perl", group="debian2"))
_stage(Stage("plapp1", "perl", "RUN apt-get install -y libjson-perl libyaml-libyaml-perl && COPY app /opt/app",
             shell=APT + "apt-get install -y -q --no-install-recommends libjson-perl libyaml-libyaml-perl",
             py=_plapp(1), group="debian2"))
_stage(Stage("plcfg1", "plapp1", "RUN useradd -r -u 998 app && COPY app.yml /etc/app/",
             shell="useradd -r -u 998 -d /opt/app app", py=_plcfg(1), group="debian2"))
_stage(Stage("plapp2", "perl", "RUN apt-get install -y libjson-perl libyaml-libyaml-perl && COPY app /opt/app  # v2",
             shell=APT + "apt-get install -y -q --no-install-recommends libjson-perl libyaml-libyaml-perl",
             py=_plapp(2), group="debian2"))
_stage(Stage("plcfg2", "plapp2", "RUN useradd -r -u 998 app && COPY app.yml /etc/app/  # v2",
             shell="useradd -r -u 998 -d /opt/app app", py=_plcfg(2), group="debian2"))
_stage(Stage("nginx", "base", "RUN apt-get update && apt-get install -y nginx",
             shell=APT + "apt-get update -q && apt-get install -y -q nginx", group="debian2"))
_stage(Stage("nsite1", "nginx", "RUN rm /etc/nginx/sites-enabled/default && COPY site /var/www/html",
             shell="rm /etc/nginx/sites-enabled/default", py=_site(1, "index.nginx-debian.html"), group="debian2"))
_stage(Stage("nsite2", "nginx", "RUN rm /etc/nginx/sites-enabled/default && COPY site /var/www/html  # v2",
             shell="rm /etc/nginx/sites-enabled/default", py=_site(2, "index.nginx-debian.html"), group="debian2"))
_stage(Stage("nginx_perl", "perl", "RUN apt-get install -y nginx libfcgi-perl",
             shell=APT + "apt-get install -y -q nginx libfcgi-perl", group="debian2"))
_stage(Stage("plcfg3", "nginx_perl", "COPY app.fcgi nginx.conf && RUN ln -s ../sites-available/app sites-enabled/",
             shell="ln -s ../sites-available/app /etc/nginx/sites-enabled/app", py=_fcgi, py_first=True,
             group="debian2"))

_stage(Stage("sbase", None, "COPY rootfs /", py=_small_base, group="small"))
_stage(Stage("big", "sbase", "COPY big.bin /data/", py=_big, group="bigfile"))
_stage(Stage("bigedit", "big", "RUN dd if=patch of=/data/big.bin bs=1M seek=75 conv=notrunc",
             py=_big_edit, group="bigfile"))
_stage(Stage("small", "sbase", "COPY node_modules /app/node_modules", py=_small_files, group="smallfiles"))
_stage(Stage("many", "sbase", "COPY mono /srv/mono", py=_many_files, group="manyfiles"))
_stage(Stage("chain001", None, "COPY rootfs /", py=_chain_base, group="chain"))
for _n in range(2, CHAIN_LAYERS + 1):
    _stage(Stage(f"chain{_n:03d}", f"chain{_n - 1:03d}", f"RUN update step {_n}", py=_chain_step(_n), group="chain"))


# Images -----------------------------------------------------------------------


@dataclass
class Image:
    slug: str  # file name stem
    name: str  # repo:tag, as io.containerd.image.name
    layers: list[str]
    group: str
    cmd: list[str] = field(default_factory=lambda: ["/bin/sh"])

    @property
    def ref_name(self) -> str:
        # org.opencontainers.image.ref.name: umoci and skopeo select images by it.
        return self.slug


IMAGES: dict[str, Image] = {}


def _image(slug, name, layers, group, cmd=None):
    IMAGES[slug] = Image(slug, name, layers, group, cmd or ["/bin/sh"])


_image("deb", "bench/deb:12", ["base"], "debian", ["bash"])
_image("py-app-1", "bench/py-app:1", ["base", "py", "app1", "cfg1"], "debian", ["python3", "/app/main.py"])
_image("py-app-2", "bench/py-app:2", ["base", "py", "app2", "cfg2"], "debian", ["python3", "/app/main.py"])
_image("web-1", "bench/web:1", ["base", "apache", "site1"], "debian", ["apache2ctl", "-DFOREGROUND"])
_image("web-2", "bench/web:2", ["base", "apache", "site2"], "debian", ["apache2ctl", "-DFOREGROUND"])
_image("py-web-1", "bench/py-web:1", ["base", "py", "apache_py", "cfg3"], "debian", ["apache2ctl", "-DFOREGROUND"])
_image("pl-app-1", "bench/pl-app:1", ["base", "perl", "plapp1", "plcfg1"], "debian2", ["perl", "/opt/app/bin/app.pl"])
_image("pl-app-2", "bench/pl-app:2", ["base", "perl", "plapp2", "plcfg2"], "debian2", ["perl", "/opt/app/bin/app.pl"])
_image("nginx-1", "bench/nginx:1", ["base", "nginx", "nsite1"], "debian2", ["nginx", "-g", "daemon off;"])
_image("nginx-2", "bench/nginx:2", ["base", "nginx", "nsite2"], "debian2", ["nginx", "-g", "daemon off;"])
_image("pl-web-1", "bench/pl-web:1", ["base", "perl", "nginx_perl", "plcfg3"], "debian2",
       ["nginx", "-g", "daemon off;"])
_image("chain", "bench/chain:100", [f"chain{n:03d}" for n in range(1, CHAIN_LAYERS + 1)], "chain")
_image("bigfile-1", "bench/bigfile:1", ["sbase", "big"], "bigfile")
_image("bigfile-2", "bench/bigfile:2", ["sbase", "big", "bigedit"], "bigfile")
_image("smallfiles", "bench/smallfiles:1", ["sbase", "small"], "smallfiles")
_image("manyfiles", "bench/manyfiles:1", ["sbase", "many"], "manyfiles")

FAMILY = ["py-app-1", "py-app-2", "web-1", "web-2", "py-web-1"]
# A second family of the same shape from other packages (perl, nginx): a store-size
# figure on one family alone could be tuned to it.
FAMILY2 = ["pl-app-1", "pl-app-2", "nginx-1", "nginx-2", "pl-web-1"]
DEB_PYTHON = "py-app-1"  # the "Debian + python3" image: base, apt install python3, app, config
DEB_APACHE = "web-1"  # the "Debian + apache2" image
GROUPS = ("debian", "debian2", "chain", "bigfile", "smallfiles", "manyfiles")


# Paths --------------------------------------------------------------------------


def stage_dir(name: str) -> Path:
    return cache_dir() / "stages" / name


def layer_blob(name: str) -> Path:
    return cache_dir() / "layers" / f"{name}.tar.gz"


def layer_meta(name: str) -> dict:
    return json.loads((cache_dir() / "layers" / f"{name}.json").read_text())


def oci_archive(slug: str) -> Path:
    return cache_dir() / "images" / f"{slug}.oci.tar"


def docker_archive(slug: str) -> Path:
    return cache_dir() / "images" / f"{slug}.docker.tar"


def family_archive(family: list[str] | None = None) -> Path:
    """The archive of FAMILY (the default) or FAMILY2, each family's shared blobs once."""
    name = "family2" if family == FAMILY2 else "family"
    return cache_dir() / "images" / f"{name}.oci.tar"


def unpacked(slug: str) -> Path:
    """The image's top view on disk, as `umoci unpack` writes it (built once, cached)."""
    ensure_images([slug])
    d = cache_dir() / "unpacked" / slug
    rootfs = d / "bundle" / "rootfs"
    if (d / "done").exists():
        return rootfs
    rmtree(d)
    layout = d / "layout"
    layout.mkdir(parents=True)
    subprocess.run(["tar", "-xf", str(oci_archive(slug)), "-C", str(layout)], check=True)
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:{IMAGES[slug].ref_name}", str(d / "bundle")],
                   check=True, stdout=subprocess.DEVNULL)
    rmtree(layout)
    (d / "done").write_text("")
    return rootfs


def saved_layers(slug: str) -> list[Path]:
    """The layer tars of the image's `docker save` archive, extracted (uncompressed), bottom first."""
    ensure_images([slug])
    d = cache_dir() / "saved" / slug
    if not (d / "done").exists():
        rmtree(d)
        d.mkdir(parents=True)
        subprocess.run(["tar", "-xf", str(docker_archive(slug)), "-C", str(d)], check=True)
        (d / "done").write_text("")
    manifest = json.loads((d / "manifest.json").read_text())
    return [d / name for name in manifest[0]["Layers"]]


# Building stages ------------------------------------------------------------------


def _chroot(root: Path, script: str) -> None:
    """Run a shell script in the tree with /proc, /dev and the host's DNS; leave no trace of them."""
    resolv = root / "etc/resolv.conf"
    saved = resolv.read_bytes() if resolv.is_file() and not resolv.is_symlink() else None
    existed = resolv.exists() or resolv.is_symlink()
    if existed:
        resolv.unlink()
    resolv.write_bytes(Path("/etc/resolv.conf").read_bytes())
    mounts = []
    try:
        subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
        mounts.append(root / "proc")
        subprocess.run(["mount", "--bind", "/dev", str(root / "dev")], check=True)
        mounts.append(root / "dev")
        env = {"PATH": PATH_ENV[5:], "LANG": "C.UTF-8", "HOME": "/root"}
        with open(cache_dir() / "build.log", "ab") as logf:
            subprocess.run(["chroot", str(root), "/bin/sh", "-ec", script], check=True, env=env,
                           stdout=logf, stderr=subprocess.STDOUT)
    finally:
        for m in reversed(mounts):
            subprocess.run(["umount", str(m)], check=True)
        resolv.unlink()
        if saved is not None:
            resolv.write_bytes(saved)
    left = mounted_below(root)
    if left:
        raise RuntimeError(f"still mounted below {root}: {left}")


def _debootstrap() -> Path:
    d = cache_dir() / "debootstrap"
    if (cache_dir() / "debootstrap.done").exists():
        return d
    if not shutil.which("debootstrap"):
        subprocess.run(["apt-get", "install", "-y", "debootstrap"], check=True)
    rmtree(d)
    log(f"debootstrap --variant=minbase {SUITE} from {MIRROR} (about a minute)")
    subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(d), MIRROR], check=True,
                   stdout=subprocess.DEVNULL)
    (cache_dir() / "debootstrap.done").write_text("")
    return d


DOCKER_CLEAN = """\
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
"""


def _clean_base(root: Path) -> None:
    """What official Debian images do after debootstrap: no package caches, no device nodes."""
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "dev", "proc", "sys", "run"):
        d = root / sub
        for c in d.iterdir() if d.is_dir() else ():
            if c.name in ("partial", "lock"):
                continue
            if c.is_dir() and not c.is_symlink():
                rmtree(c)
            else:
                c.unlink()
    for f in ("var/cache/apt/pkgcache.bin", "var/cache/apt/srcpkgcache.bin", "etc/resolv.conf"):
        p = root / f
        if p.exists() or p.is_symlink():
            p.unlink()
    # docker's mkimage/debootstrap script: services must not start during builds
    _write(root, "usr/sbin/policy-rc.d", "#!/bin/sh\nexit 101\n", 0o755)
    # As in the official debian images (debuerreotype): no .deb or pkgcache left
    # behind by apt in a layer.  Package lists stay: most Dockerfiles keep them.
    _write(root, "etc/apt/apt.conf.d/docker-clean", DOCKER_CLEAN)


def build_stage(name: str) -> Path:
    d = stage_dir(name)
    done = d.with_name(name + ".done")
    if done.exists():
        return d
    s = STAGES[name]
    if s.parent is not None:
        build_stage(s.parent)
    log(f"stage {name}: {s.created_by}")
    rmtree(d)
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = d.with_name(name + ".tmp")
    rmtree(tmp)
    if s.parent is not None:
        subprocess.run(["cp", "-a", "--reflink=auto", str(stage_dir(s.parent)), str(tmp)], check=True)
    elif name == "base":
        subprocess.run(["cp", "-a", "--reflink=auto", str(_debootstrap()), str(tmp)], check=True)
        _clean_base(tmp)
    else:
        tmp.mkdir()
        os.chmod(tmp, 0o755)
    if s.py and s.py_first:
        s.py(tmp)
    if s.shell:
        _chroot(tmp, s.shell)
    if s.py and not s.py_first:
        s.py(tmp)
    tmp.rename(d)
    done.write_text("")
    return d


# Layers: the difference of two trees -------------------------------------------------


class _Hashing:
    """A write-only file that hashes and counts what goes through it."""

    def __init__(self, f=None):
        self.f = f
        self.h = hashlib.sha256()
        self.n = 0

    def write(self, b) -> int:
        self.h.update(b)
        self.n += len(b)
        if self.f is not None:
            self.f.write(b)
        return len(b)

    def flush(self) -> None:
        if self.f is not None:
            self.f.flush()


def _same_file(a: str, b: str, sa: os.stat_result, sb: os.stat_result) -> bool:
    if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode):
        return False
    if (sa.st_mode, sa.st_uid, sa.st_gid) != (sb.st_mode, sb.st_uid, sb.st_gid):
        return False
    if stat.S_ISDIR(sa.st_mode):
        return int(sa.st_mtime) == int(sb.st_mtime)
    if int(sa.st_mtime) != int(sb.st_mtime) or sa.st_size != sb.st_size:
        return False
    if stat.S_ISLNK(sa.st_mode):
        return os.readlink(a) == os.readlink(b)
    if stat.S_ISCHR(sa.st_mode) or stat.S_ISBLK(sa.st_mode):
        return sa.st_rdev == sb.st_rdev
    if stat.S_ISREG(sa.st_mode):
        # Same size and mtime is not proof (dpkg can rewrite a file within a
        # second): compare the bytes.
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                x, y = fa.read(1 << 20), fb.read(1 << 20)
                if x != y:
                    return False
                if not x:
                    return True
    return True


def tree_diff(lower: Path | None, upper: Path) -> list[tuple[str, str]]:
    """The changes from lower to upper, in tar order: ("put", rel), ("whiteout", rel), ("opaque", dir)."""
    def walk(rel: str) -> list[tuple[str, str]]:
        up = os.path.join(upper, rel) if rel else str(upper)
        lo = (os.path.join(lower, rel) if rel else str(lower)) if lower is not None else None
        names_up = set(os.listdir(up))
        names_lo: set[str] = set()
        if lo is not None and os.path.isdir(lo) and not os.path.islink(lo):
            names_lo = set(os.listdir(lo))
        res: list[tuple[str, str]] = []
        if names_lo and len(names_lo) >= 2 and not (names_lo & names_up):
            res.append(("opaque", rel))
            names_lo = set()
        for name in sorted(names_up | names_lo):
            r = f"{rel}/{name}" if rel else name
            if name not in names_up:
                res.append(("whiteout", r))
                continue
            pu = os.path.join(up, name)
            su = os.lstat(pu)
            sl = None
            if name in names_lo:
                sl = os.lstat(os.path.join(lo, name))
            if stat.S_ISDIR(su.st_mode):
                if sl is not None and not stat.S_ISDIR(sl.st_mode):
                    sl = None  # a directory over a file: everything below is new
                children = walk_new(r) if sl is None else walk(r)
                if sl is None or children or not _same_file(os.path.join(lo, name), pu, sl, su):
                    res.append(("put", r))
                    res.extend(children)
            elif sl is None or not _same_file(os.path.join(lo, name), pu, sl, su):
                res.append(("put", r))
        return res

    def walk_new(rel: str) -> list[tuple[str, str]]:
        res = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(upper, rel) if rel else upper):
            base = os.path.relpath(dirpath, upper)
            prefix = "" if base == "." else base + "/"
            res.extend(("put", prefix + n) for n in dirnames + filenames)
        # os.walk lists a directory's entries before descending: reorder so that
        # every entry comes right after its parent, as tar does.
        return sorted(res, key=lambda e: e[1].split("/"))

    return walk_new("") if lower is None else walk("")


def write_layer(name: str) -> dict:
    """The layer of stage `name` as a gzip tar, with its diff_id and digest."""
    meta_path = cache_dir() / "layers" / f"{name}.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    s = STAGES[name]
    upper = build_stage(name)
    lower = build_stage(s.parent) if s.parent else None
    changes = tree_diff(lower, upper)
    blob = layer_blob(name)
    blob.parent.mkdir(parents=True, exist_ok=True)
    tmp = blob.with_suffix(".tmp")
    mtime = 1704067200  # CREATED, for whiteout entries
    with open(tmp, "wb") as raw:
        gz_hash = _Hashing(raw)
        with gzip.GzipFile(fileobj=gz_hash, mode="wb", compresslevel=6, mtime=0) as gz:
            tar_hash = _Hashing(gz)
            with tarfile.open(fileobj=tar_hash, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                files = 0
                for kind, rel in changes:
                    parent, _, base = rel.rpartition("/")
                    if kind in ("whiteout", "opaque"):
                        marker = ".wh..wh..opq" if kind == "opaque" else ".wh." + base
                        mdir = rel if kind == "opaque" else parent
                        ti = tarfile.TarInfo(f"{mdir}/{marker}" if mdir else marker)
                        ti.mtime = mtime
                        ti.mode = 0o644
                        tar.addfile(ti)
                        continue
                    full = os.path.join(upper, rel)
                    ti = tar.gettarinfo(full, arcname=rel)
                    ti.mtime = int(ti.mtime)
                    ti.uname = ti.gname = ""
                    if ti.isreg():
                        files += 1
                        with open(full, "rb") as f:
                            tar.addfile(ti, f)
                    else:
                        tar.addfile(ti)
    tmp.rename(blob)
    meta = {
        "name": name,
        "diff_id": "sha256:" + tar_hash.h.hexdigest(),
        "digest": "sha256:" + gz_hash.h.hexdigest(),
        "size": gz_hash.n,
        "tar_size": tar_hash.n,
        "entries": len(changes),
        "files": files,
        "created_by": s.created_by,
    }
    meta_path.write_text(json.dumps(meta, indent=1))
    log(f"layer {name}: {len(changes)} entries, tar {tar_hash.n / MiB:.1f} MiB, gzip {gz_hash.n / MiB:.1f} MiB")
    return meta


# Archives ------------------------------------------------------------------------------


def _jbytes(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _manifest(img: Image) -> tuple[bytes, bytes]:
    """(config bytes, manifest bytes) of an image."""
    metas = [write_layer(n) for n in img.layers]
    history = []
    for i, m in enumerate(metas):
        history.append({"created": CREATED, "created_by": m["created_by"]})
        if i == 0:
            history.append({"created": CREATED, "created_by": f'ENV {PATH_ENV}', "empty_layer": True})
    history.append({"created": CREATED, "created_by": f"CMD {json.dumps(img.cmd)}", "empty_layer": True})
    config = _jbytes({
        "created": CREATED,
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": [PATH_ENV], "Cmd": img.cmd},
        "rootfs": {"type": "layers", "diff_ids": [m["diff_id"] for m in metas]},
        "history": history,
    })
    manifest = _jbytes({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                   "size": len(config)},
        "layers": [{"mediaType": MT_LAYER_GZ, "digest": m["digest"], "size": m["size"]} for m in metas],
    })
    return config, manifest


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = 1704067200
    ti.mode = 0o644
    tar.addfile(ti, io.BytesIO(data))


def write_oci_archive(path: Path, imgs: list[Image]) -> None:
    """An OCI image layout as a tar: oci-layout, index.json, blobs/sha256/*, each blob once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": []}
    written: set[str] = set()
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        ti = tarfile.TarInfo("blobs")
        ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1704067200
        tar.addfile(ti)
        ti = tarfile.TarInfo("blobs/sha256")
        ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1704067200
        tar.addfile(ti)
        for img in imgs:
            config, manifest = _manifest(img)
            for n in img.layers:
                m = layer_meta(n)
                hexd = m["digest"][7:]
                if hexd not in written:
                    written.add(hexd)
                    tar.add(str(layer_blob(n)), arcname=f"blobs/sha256/{hexd}")
            for data in (config, manifest):
                hexd = hashlib.sha256(data).hexdigest()
                if hexd not in written:
                    written.add(hexd)
                    _add_bytes(tar, f"blobs/sha256/{hexd}", data)
            index["manifests"].append({
                "mediaType": MT_MANIFEST,
                "digest": "sha256:" + hashlib.sha256(manifest).hexdigest(),
                "size": len(manifest),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"org.opencontainers.image.ref.name": img.ref_name,
                                "io.containerd.image.name": img.name},
            })
        _add_bytes(tar, "index.json", _jbytes(index))
    tmp.rename(path)


def build_image(slug: str) -> None:
    img = IMAGES[slug]
    oci = oci_archive(slug)
    if not oci.exists():
        for n in img.layers:
            write_layer(n)
        write_oci_archive(oci, [img])
        # An independent reader must accept what we wrote.
        subprocess.run(["skopeo", "inspect", f"oci-archive:{oci}:{img.ref_name}"], check=True,
                       stdout=subprocess.DEVNULL)
        log(f"image {img.name}: {oci}")
    dock = docker_archive(slug)
    if not dock.exists():
        tmp = dock.with_suffix(".tmp")
        if tmp.exists():
            tmp.unlink()
        subprocess.run(["skopeo", "copy", "-q", f"oci-archive:{oci}:{img.ref_name}",
                        f"docker-archive:{tmp}:{img.name}"], check=True)
        tmp.rename(dock)


def ensure_images(slugs: list[str]) -> None:
    for s in slugs:
        if not oci_archive(s).exists() or not docker_archive(s).exists():
            _need_root()
            build_image(s)
    for fam in (FAMILY, FAMILY2):
        if set(fam) <= set(slugs) and not family_archive(fam).exists():
            write_oci_archive(family_archive(fam), [IMAGES[s] for s in fam])


def ensure_group(group: str) -> list[str]:
    slugs = [s for s, i in IMAGES.items() if i.group == group]
    ensure_images(slugs)
    return slugs


def _need_root() -> None:
    if os.geteuid() != 0:
        sys.exit("bench/images.py: building images needs root (debootstrap, chroot, mount); "
                 "run `sudo python3 bench/images.py` once, then the benches reuse the cache")
    for tool, pkg in (("skopeo", "skopeo"), ("umoci", "umoci"), ("debootstrap", "debootstrap"), ("/usr/bin/time", "time")):
        if not shutil.which(tool):
            subprocess.run(["apt-get", "install", "-y", pkg], check=True)


def unique_blob_bytes(slugs: list[str]) -> int:
    """Bytes of the distinct gzip layer blobs: what a registry or containerd stores."""
    seen: dict[str, int] = {}
    for s in slugs:
        for n in IMAGES[s].layers:
            m = layer_meta(n)
            seen[m["digest"]] = m["size"]
    return sum(seen.values())


def unpacked_size(slug: str) -> int:
    """Sum of the top view's regular-file sizes (hard links once), like `du -b --apparent-size`."""
    total, seen = 0, set()
    for dirpath, _, files in os.walk(unpacked(slug)):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def verify() -> bool:
    """tests/tree_manifest.py of the stage tree == of the `umoci unpack` of the image."""
    tool = Path(__file__).resolve().parent.parent / "tests" / "tree_manifest.py"
    ok = True
    for slug, img in IMAGES.items():
        if not oci_archive(slug).exists():
            continue
        want = subprocess.run([sys.executable, str(tool), str(stage_dir(img.layers[-1]))],
                              check=True, capture_output=True).stdout
        got = subprocess.run([sys.executable, str(tool), str(unpacked(slug))], check=True, capture_output=True).stdout
        same = want == got
        ok &= same
        print(f"{'ok  ' if same else 'DIFF'} {img.name}: {len(want.splitlines())} entries")
    return ok


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="Build and cache the benchmark images.")
    p.add_argument("--only", choices=GROUPS, action="append", help="build only this group (repeatable)")
    p.add_argument("--list", action="store_true", help="list the cached images and their sizes")
    p.add_argument("--verify", action="store_true",
                   help="check that umoci rebuilds each image's top view exactly as the tree its layers came from")
    a = p.parse_args()
    if a.verify:
        sys.exit(0 if verify() else 1)
    if a.list:
        for slug, img in IMAGES.items():
            oci = oci_archive(slug)
            if oci.exists():
                print(f"{img.name:22} {len(img.layers):4} layers  {oci.stat().st_size / MiB:8.1f} MiB  {oci}")
            else:
                print(f"{img.name:22} {len(img.layers):4} layers  (not built)")
        return
    for g in a.only or GROUPS:
        ensure_group(g)
    log(f"images ready in {cache_dir() / 'images'}")


if __name__ == "__main__":
    main()
