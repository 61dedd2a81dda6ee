"""The executor: a parsed Dockerfile -> an image in the store.

Each RUN, COPY and ADD makes a layer; every other instruction makes a history
entry with empty_layer, and the config and history come out as
`buildah bud --layers --format docker` writes them (build.md §2).  Deliberate
choices where buildah 1.28 and the Dockerfile reference part ways (each is
covered by a test):

- `--chown` owns the parent directories COPY/ADD create, as buildah does;
  parents that exist keep their owner.
- An exec-form RUN is recorded as buildah records it, `/bin/sh -c ["a", "b"]`;
  RUN history says `/bin/sh -c` after a SHELL too (buildah), but the command
  runs with the SHELL, and a shell-form CMD/ENTRYPOINT uses the SHELL (the
  reference; buildah ignores SHELL there).
- WORKDIR is an empty layer; the directory lands in the next step's layer.
- The runtime's mountpoints (/proc, /dev, /sys, /etc/hosts, ...) never land
  in a layer, unlike buildah 1.28 (buildah #4242).
- Heredocs, `--link`, symbolic `--chmod`, `COPY --parents/--exclude` and
  `ADD --checksum` follow the reference (buildah 1.28 has none of them).
- RUN --mount: the mountpoints it needed, parents included, are not left in
  the layer (buildah leaves the parents); writes to a read-write bind are
  thrown away, as the reference says (buildah 1.28 writes them into the
  context); a bind shows the context directory as it is, .dockerignore
  applying to COPY only (as buildah); a cache's `sharing` is the reference's
  (locked: one step at a time; private: an instance of its own per concurrent
  use), and `from=`/`source=` seed a new cache from a stage.  A bind's
  contents join the step's key; a cache's or secret's never do.
- FROM --platform (or the build's --platform) takes that platform's image of
  the index a stored image was pulled from; a stored image of another platform
  is pulled for it when pulling is allowed, else refused, and still refused if
  the registry has only that one.
- RUN's root, in this order (the output says once which fallback it took, and
  why; BuildOptions.overlay or $LAYERDB_BUILD_ROOT=kernel|fuse|export forces one):
  1. kernel overlayfs: a mount costs about 20 ms and the layer is the upper
     directory, so a step costs what it changes, not the image;
  2. fuse-overlayfs, where the kernel's cannot mount (no overlay support, an
     upper on a file system it refuses) or past its 500 lower layers: still
     O(changes) and the same upper-directory format, but every file operation
     goes through a daemon (build.md: 5-10x slower writes);
  3. export, run, apply (engine/build/rootdir.py), where neither serves: the
     parent view is written into a directory, the step runs there, and the
     difference becomes the layer.  It needs nothing but the namespaces, but
     costs the whole view per step, in time and disk, so it comes last.
  All three give the same layers (tests/test_build_fallback.py), overlayfs's
  copy-up included; rootdir.py names the two corners where they cannot.

The cache: a step's key chains its parent's key with the instruction as
written and every input it resolves (args, env, user, workdir, and for
COPY/ADD the sha256, mode and owner of each source as stored, mtimes left
out).  Each entry keeps its inputs, so a miss can say which one changed.
Cache entries name diffs weakly: `gc` removes diffs no image uses, and an entry
whose diff is gone is a miss.
"""

from __future__ import annotations

import bz2
import fcntl
import datetime as _dt
import gzip
import hashlib
import json
import lzma
import os
import platform
import re
import shutil
import stat
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .. import refs
from ..content import ContentStore
from ..errors import BuildError, ContextError, DockerfileError, LayerdbError, NotFound, StepFailed
from ..ingest.importer import DiffResult, Importer, chain_ids
from ..tarstream import TarReader
from ..replay import Node, View, below, decided_events
from ..store import Store
from . import cache
from . import dockerfile as df
from . import mounts as mounts_
from . import rootdir, runtime
from .context import Context
from .ignore import Ignore
from .layers import LayerEntry, materialize, upper_entries, write_layer
from .shell import expand_word, expand_words

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_SHELL = ["/bin/sh", "-c"]
PROXY_ARGS = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "FTP_PROXY", "ftp_proxy", "NO_PROXY",
              "no_proxy", "ALL_PROXY", "all_proxy")
SECRETS_DIR = "/dev/shm"  # tmpfs: where RUN --mount=type=secret copies are bound from
ROOT_MODES = ("auto", "kernel", "fuse", "export")
OUTPUT_TAIL = 20  # lines of a failed RUN's output in its error
ARCHIVE_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))

Progress = Callable[[str, str], None]  # (kind, text): "step", "cache", "output" (raw RUN output), "info"


def host_platform() -> tuple[str, str, str | None]:
    m = platform.machine().lower()
    arch, variant = {"x86_64": ("amd64", None), "amd64": ("amd64", None), "aarch64": ("arm64", "v8"),
                     "arm64": ("arm64", "v8"), "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
                     "i686": ("386", None), "i386": ("386", None), "ppc64le": ("ppc64le", None),
                     "s390x": ("s390x", None), "riscv64": ("riscv64", None)}.get(m, (m, None))
    return "linux", arch, variant


def iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(int(t), _dt.timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class BuildOptions:
    context: str
    dockerfile: str | None = None  # default: CONTEXT/Dockerfile (or Containerfile)
    tags: list[str] = field(default_factory=list)
    build_args: dict[str, str] = field(default_factory=dict)
    target: str | None = None
    no_cache: bool = False
    timestamp: int | None = None  # --timestamp / SOURCE_DATE_EPOCH
    network: str = "host"
    cache_dir: str | None = None  # materialised layers for RUN; default $XDG_CACHE_HOME/layerdb
    # FROM of an image not in the store pulls it (buildah's pull policy "missing"),
    # with these registry options (engine/registry/auth.options); None: never pull.
    registry: object | None = None
    secrets: dict[str, str] = field(default_factory=dict)  # RUN --mount=type=secret: id -> host file
    platform: str | None = None  # OS/ARCH[/VARIANT] of the build; None: this machine's
    cache_max: int = cache.DEFAULT_MAX  # bytes of materialised layers kept after the build
    # RUN's root: "auto" (the kernel's overlayfs, else fuse-overlayfs, else export/run/apply),
    # or one of them forced: "kernel", "fuse", "export" (also $LAYERDB_BUILD_ROOT, for the CLI).
    overlay: str = "auto"


@dataclass
class StageState:
    stage: df.Stage
    chain: list[DiffResult] = field(default_factory=list)
    cfg: dict = field(default_factory=dict)
    args: dict[str, str] = field(default_factory=dict)  # declared in this stage, with their values
    key: str = ""
    image_ref: str = ""  # the FROM as written, expanded
    parent_id: str | None = None  # the id of the image state before the next step (for history comments)
    first: bool = True
    shell: list[str] = field(default_factory=lambda: list(DEFAULT_SHELL))

    @property
    def config(self) -> dict:
        return self.cfg.setdefault("config", {})

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for e in self.config.get("Env") or []:
            k, _, v = e.partition("=")
            out[k] = v
        return out

    def scope(self) -> dict[str, str]:
        """What $NAME means in this stage: its args, with ENV taking precedence."""
        return {**self.args, **self.env()}


@dataclass
class BuildResult:
    id: str
    tags: list[str]
    layers: int
    steps: int = 0
    cached: int = 0
    new_image: bool = True
    misses: list[dict] = field(default_factory=list)  # {"line", "step", "why"} per step built again
    layer_id: str | None = None  # the top layer's chain id


class Builder:
    def __init__(self, store: Store, content: ContentStore, opts: BuildOptions, progress: Progress | None = None):
        self.store = store
        self.content = content
        self.opts = opts
        self.say = progress or (lambda kind, text: None)
        self.host = host_platform()
        self.os, self.arch, self.variant = _parse_platform(opts.platform) if opts.platform else self.host
        ctx = os.path.abspath(opts.context)
        self.dockerfile_path = opts.dockerfile or next(
            (os.path.join(ctx, n) for n in ("Dockerfile", "Containerfile") if os.path.isfile(os.path.join(ctx, n))),
            os.path.join(ctx, "Dockerfile"))
        self.context = Context(ctx, Ignore.for_build(ctx, self.dockerfile_path))
        self.cache_dir = opts.cache_dir or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "layerdb")
        self.done: dict[int, StageState] = {}
        self._used: set[str] = set()  # the cached layer dirs this build used
        self._origin = os.path.realpath(store.path)  # whose layers this build's cache entries are
        self.result = BuildResult("", list(opts.tags), 0)
        self.tmp: str | None = None
        self.missed = False  # once a step misses, every later step of its stage does
        self.root_mode = opts.overlay if opts.overlay != "auto" else os.environ.get("LAYERDB_BUILD_ROOT") or "auto"
        if self.root_mode not in ROOT_MODES:
            raise BuildError(f"{'LAYERDB_BUILD_ROOT' if opts.overlay == 'auto' else 'overlay'}={self.root_mode}:"
                             f" use one of {', '.join(ROOT_MODES)}")
        self.timestamp = opts.timestamp
        if self.timestamp is None and os.environ.get("SOURCE_DATE_EPOCH", "").isdigit():
            self.timestamp = int(os.environ["SOURCE_DATE_EPOCH"])

    # The whole build ---------------------------------------------------------------

    def build(self) -> BuildResult:
        try:
            with open(self.dockerfile_path, "rb") as f:
                text = f.read()
        except OSError as e:
            raise BuildError(f"{self.dockerfile_path}: cannot read the Dockerfile: {e.strerror}") from None
        self.df = df.parse(text, os.path.basename(self.dockerfile_path))
        self.global_args = self._global_args()
        target = self.df.stages[-1]
        if self.opts.target:
            target = self.df.stage(self.opts.target)
            if target is None:
                raise BuildError(f"--target {self.opts.target}: no such stage in {self.df.path}"
                                 f" (stages: {', '.join(s.name or str(s.index) for s in self.df.stages)})")
        self.total = sum(1 + len(s.instructions) for s in self.df.stages)
        layers = os.path.join(self.cache_dir, "layers")
        for d in (layers, os.path.join(self.cache_dir, "tmp")):
            cache.clean_stale(d)
        cache.clean_stale(os.path.join(self.cache_dir, "mounts"), ("build",), tmp_files=False)
        cache.clean_stale(SECRETS_DIR, ("layerdb-secret",), tmp_files=False)
        # The build's scratch space lives beside the layer cache, not in /tmp: a step's
        # overlay work dir must share the upper dir's file system, and a build that was
        # killed leaves it where the next build cleans it up.
        os.makedirs(os.path.join(self.cache_dir, "tmp"), exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=f"build-{os.getpid()}-", dir=os.path.join(self.cache_dir, "tmp"))
        lock = cache.lock(layers)
        try:
            state = self._stage(target.index)
            result = self._finish(state)
            with self.store.read():
                live = {cache.name_of(d) for (d,) in self.store.execute("SELECT diff_id FROM diff")}
            cache.collect(layers, lock, self._origin, live, self._used, self.opts.cache_max)
            return result
        finally:
            os.close(lock)
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _global_args(self) -> dict[str, str]:
        out = dict(self._platform_args())
        for ins in self.df.global_args:
            for name, default in ins.names:
                if name in self.opts.build_args:
                    out[name] = self.opts.build_args[name]
                elif default is not None:
                    out[name] = self._expand(ins, default, out)
        return out

    def _platform_args(self) -> dict[str, str]:
        def of(os_: str, arch: str, variant: str | None) -> dict[str, str]:
            plat = f"{os_}/{arch}" + (f"/{variant}" if variant else "")
            return {"OS": os_, "ARCH": arch, "VARIANT": variant or "", "PLATFORM": plat}

        return {**{"BUILD" + k: v for k, v in of(*self.host).items()},
                **{"TARGET" + k: v for k, v in of(self.os, self.arch, self.variant).items()}}

    def _want(self, frm: df.From) -> tuple[str, str, str | None] | None:
        """The platform a FROM asks for: its --platform, else the build's; None: any."""
        if frm.platform:
            text = self._expand(frm, frm.platform, self.global_args)
            try:
                return _parse_platform(text)
            except LayerdbError as e:
                raise DockerfileError(f"FROM --platform={text}: {e.message}", self.df.path, frm.line) from None
        return (self.os, self.arch, self.variant) if self.opts.platform else None

    def _expand(self, ins: df.Instruction, word: str, env: dict[str, str]) -> str:
        try:
            return expand_word(word, env, self.df.escape, ins.keyword)
        except DockerfileError as e:
            raise e.at(self.df.path, ins.line) from None

    def _err(self, ins: df.Instruction, message: str, cls=DockerfileError) -> LayerdbError:
        if cls is DockerfileError:
            return DockerfileError(message, self.df.path, ins.line)
        return cls(f"{self.df.path}:{ins.line}: {ins.original}: {message}")

    # Stages ------------------------------------------------------------------------------

    def _stage(self, index: int) -> StageState:
        if index in self.done:
            return self.done[index]
        stage = self.df.stages[index]
        st = StageState(stage)
        frm = stage.from_
        image = self._expand(frm, frm.image, self.global_args)
        st.image_ref = image
        step = self._step_no(stage, None)
        self.say("step", f"STEP {step}/{self.total}: {frm.original}")
        base = self.df.stage(image) if image.lower() != "scratch" else None
        if base is not None and base.index >= index:
            base = None
        if base is not None:
            parent = self._stage(base.index)
            st.chain = list(parent.chain)
            st.cfg = json.loads(json.dumps(parent.cfg))
            st.key = _sha(["stage", parent.key])
            st.parent_id = _config_id(st.cfg)
        elif image.lower() == "scratch":
            os_, arch, variant = self._want(frm) or (self.os, self.arch, self.variant)
            st.cfg = {"architecture": arch, "os": os_, "config": {"Env": [DEFAULT_PATH]},
                      "rootfs": {"type": "layers", "diff_ids": []}, "history": []}
            if variant:
                st.cfg["variant"] = variant
            st.key = _sha(["scratch", arch] + ([os_, variant] if (os_, variant) != ("linux", None) else []))
        else:
            self._from_image(st, frm, image)
        # A stage built in the middle of another (COPY --from, RUN --mount=from) keeps
        # its own record of misses.
        outer_missed, self.missed = self.missed, False
        onbuild = list(st.config.get("OnBuild") or [])
        st.config["OnBuild"] = []
        for trigger in onbuild:
            ins = df.parse(f"FROM scratch\n{trigger}\n", f"ONBUILD of {image}").stages[0].instructions[0]
            self._instruction(st, ins)
        for ins in stage.instructions:
            self.say("step", f"STEP {self._step_no(stage, ins)}/{self.total}: {ins.original}")
            self._instruction(st, ins)
        self.done[index] = st
        self.missed = outer_missed
        return st

    def _step_no(self, stage: df.Stage, ins: df.Instruction | None) -> int:
        n = sum(1 + len(s.instructions) for s in self.df.stages[:stage.index]) + 1
        return n if ins is None else n + 1 + stage.instructions.index(ins)

    def _from_image(self, st: StageState, frm: df.From, image: str) -> None:
        want = self._want(frm)
        r = self._stored_image(image)
        other = None  # the platform of a stored image that is not the one asked for
        if r is not None and want is not None:
            r, other = self._platform_image(r, want)
        if r is None and self.opts.registry is not None:
            from ..registry.pull import pull

            self.say("step", f"Pulling {image}" + (f" for {_show_platform(want)}" if want else ""))
            pulled = pull(self.store, self.content, image, self.opts.registry,
                          platform=_show_platform(want) if want else None)
            r = self._stored_image(pulled.images[0]["id"])
            if r is not None and want is not None:
                r, other = self._platform_image(r, want)  # a plain manifest of another platform
        with self.store.read():
            if r is None and other is not None:
                hint = ("the registry has no other" if self.opts.registry is not None else
                        "pull that platform, or let build pull it: no --no-pull")
                raise BuildError(f"{self.df.path}:{frm.line}: FROM {image}: the stored image is {other}, not"
                                 f" {_show_platform(want)} ({hint})")
            if r is None:
                raise BuildError(f"{self.df.path}:{frm.line}: FROM {image}: no such image in the store"
                                 " (import or pull it first)")
            cfg = json.loads(self.store.scalar("SELECT config FROM image WHERE id = ?", (r.image_rowid,)))
            st.chain = [DiffResult(li.diff_rowid, li.diff_id, new=False) for li in r.layers]
        cfg.pop("container_config", None)
        cfg.pop("container", None)
        st.cfg = cfg
        st.cfg.setdefault("history", [])
        st.key = _sha(["image", r.image_digest])
        st.parent_id = r.image_digest

    def _platform_image(self, r, want: tuple[str, str, str | None]):
        """(the image for platform want: r itself, or another image of the index r was
        pulled from; None if the store has none) and, for None, r's own platform.
        An index entry's platform wins over its config's, as the index is what a pull
        chooses by."""
        with self.store.read():
            cfg = json.loads(self.store.scalar("SELECT config FROM image WHERE id = ?", (r.image_rowid,)))
            rows = self.store.execute(
                "SELECT DISTINCT i.id, i.digest, i.config, m2.digest, ix.data FROM manifest m"
                " JOIN manifest_child c ON c.child_id = m.id JOIN manifest ix ON ix.id = c.index_id"
                " JOIN manifest_child c2 ON c2.index_id = c.index_id"
                " JOIN manifest m2 ON m2.id = c2.child_id JOIN image i ON i.id = m2.image_id"
                " WHERE m.image_id = ? ORDER BY i.id != ?, i.digest", (r.image_rowid, r.image_rowid)).fetchall()
        own = _config_platform(cfg)
        for rowid, digest, config, mdigest, index in rows:
            plat = _index_platform(index, mdigest) or _config_platform(json.loads(config))
            if rowid == r.image_rowid:
                own = plat
            if plat == want:
                return (r if rowid == r.image_rowid else self._stored_image(digest)), None
        if own == want:
            return r, None
        return None, _show_platform(own)

    def _stored_image(self, image: str):
        with self.store.read():
            try:
                r = refs.resolve(self.store, image)
            except NotFound:
                return None
        return None if r.image_rowid is None or r.container else r

    # One instruction -------------------------------------------------------------------

    def _instruction(self, st: StageState, ins: df.Instruction) -> None:
        try:
            handler = getattr(self, "_do_" + ins.keyword.lower())
            handler(st, ins)
        except DockerfileError as e:
            raise e.at(self.df.path, ins.line) from None
        self.result.steps += 1

    def _history(self, st: StageState, ins: df.Instruction, created_by: str, empty: bool, created: str) -> None:
        h: dict = {"created": created}
        if st.cfg.get("author"):
            h["author"] = st.cfg["author"]
        h["created_by"] = created_by
        if st.first:
            if st.image_ref.lower() != "scratch":
                h["comment"] = "FROM " + st.image_ref
        elif st.parent_id:
            h["comment"] = "FROM " + st.parent_id.removeprefix("sha256:")[:12]
        if empty:
            h["empty_layer"] = True
        st.cfg.setdefault("history", []).append(h)
        st.cfg["created"] = created
        st.first = False
        st.parent_id = _config_id(st.cfg)

    def _now(self) -> str:
        return iso(self.timestamp if self.timestamp is not None else time.time())

    def _cached(self, st: StageState, ins: df.Instruction, inputs: dict, layer: bool) -> tuple[str, dict | None]:
        """The step's key and its cache entry (None: a miss, which is reported)."""
        key = _sha([st.key, ins.original, inputs])
        if self.opts.no_cache:
            self._miss(ins, "--no-cache")
            return key, None
        row = None
        if not self.missed:
            with self.store.read():
                row = self.store.one("SELECT diff_id, created FROM build_cache WHERE key = ?", (key,))
                if row is not None and layer:
                    if row[0] is None or self.store.one("SELECT id FROM diff WHERE diff_id = ?", (row[0],)) is None:
                        row = None
                        self._miss(ins, "the cached layer was removed (gc)")
                        return key, None
        if row is None:
            self._miss(ins, self._why(st, ins, inputs) if not self.missed else "an earlier step was rebuilt")
            return key, None
        self.result.cached += 1
        self.say("cache", f"--> Using cache {key[:12]}")
        return key, {"diff_id": row[0], "created": row[1]}

    def _why(self, st: StageState, ins: df.Instruction, inputs: dict) -> str:
        with self.store.read():
            rows = self.store.execute("SELECT inputs FROM build_cache WHERE parent = ? AND step = ?"
                                      " ORDER BY used DESC LIMIT 1", (st.key, ins.original)).fetchall()
            if not rows:
                other = self.store.one("SELECT 1 FROM build_cache WHERE step = ? LIMIT 1", (ins.original,))
        if not rows:
            return "the steps before it changed" if other else "not built before"
        return _difference(json.loads(rows[0][0]), inputs)

    def _miss(self, ins: df.Instruction, why: str) -> None:
        self.missed = True
        self.result.misses.append({"line": ins.line, "step": ins.original, "why": why})
        self.say("cache", f"--> cache miss: {why}")

    def _remember(self, st: StageState, key: str, ins: df.Instruction, inputs: dict, diff_id: str | None,
                  created: str) -> None:
        with self.store.write():
            self.store.execute(
                "INSERT INTO build_cache(key, parent, step, inputs, diff_id, created, used) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(key) DO UPDATE SET diff_id = excluded.diff_id, created = excluded.created,"
                " used = excluded.used, inputs = excluded.inputs",
                (key, st.key, ins.original, json.dumps(inputs, sort_keys=True), diff_id, created, iso(time.time())))
        st.key = key

    def _meta_step(self, st: StageState, ins: df.Instruction, apply: Callable[[], None],
                   created_by: str | None = None) -> None:
        """A config-only step: applied, then recorded as an empty_layer history entry."""
        apply()
        inputs = {"config": st.config, "author": st.cfg.get("author"), "args": st.args}
        key, hit = self._cached(st, ins, json.loads(json.dumps(inputs)), layer=False)
        created = hit["created"] if hit else self._now()
        self._history(st, ins, created_by or f"/bin/sh -c #(nop) {ins.original}", True, created)
        if not hit:
            self._remember(st, key, ins, json.loads(json.dumps(inputs)), None, created)
        else:
            st.key = key

    # Config-only instructions ----------------------------------------------------------------

    def _do_env(self, st: StageState, ins: df.Env) -> None:
        scope = st.scope()  # every substitution sees the values from before this instruction
        pairs = [(self._expand(ins, k, scope), self._expand(ins, v, scope)) for k, v in ins.pairs]

        def apply():
            env = list(st.config.get("Env") or [])
            for k, v in pairs:
                env = [e for e in env if e.partition("=")[0] != k] + [f"{k}={v}"]
            st.config["Env"] = env
        self._meta_step(st, ins, apply)

    def _do_label(self, st: StageState, ins: df.Label) -> None:
        scope = st.scope()
        pairs = [(self._expand(ins, k, scope), self._expand(ins, v, scope)) for k, v in ins.pairs]

        def apply():
            labels = dict(st.config.get("Labels") or {})
            labels.update(pairs)
            st.config["Labels"] = labels
        self._meta_step(st, ins, apply)

    def _do_maintainer(self, st: StageState, ins: df.Maintainer) -> None:
        self._meta_step(st, ins, lambda: st.cfg.__setitem__("author", ins.name))

    def _do_expose(self, st: StageState, ins: df.Expose) -> None:
        scope = st.scope()
        ports = []
        for w in ins.ports:
            for p in expand_words(w, scope, self.df.escape, "EXPOSE"):
                num, _, proto = p.partition("/")
                if not re.fullmatch(r"\d+(-\d+)?", num) or proto.lower() not in ("", "tcp", "udp", "sctp"):
                    raise self._err(ins, f"EXPOSE: invalid port {p!r}")
                ports.append(f"{num}/{(proto or 'tcp').lower()}")

        def apply():
            exposed = dict(st.config.get("ExposedPorts") or {})
            for p in ports:
                exposed[p] = {}
            st.config["ExposedPorts"] = dict(sorted(exposed.items()))
        self._meta_step(st, ins, apply)

    def _do_volume(self, st: StageState, ins: df.Volume) -> None:
        scope = st.scope()
        paths = [self._expand(ins, w, scope) for w in ins.paths]
        if any(not p for p in paths):
            raise self._err(ins, "VOLUME specified can not be an empty string")

        def apply():
            vols = dict(st.config.get("Volumes") or {})
            for p in paths:
                vols[p] = {}
            st.config["Volumes"] = vols
        self._meta_step(st, ins, apply)

    def _do_user(self, st: StageState, ins: df.User) -> None:
        user = self._expand(ins, ins.user, st.scope())
        self._meta_step(st, ins, lambda: st.config.__setitem__("User", user))

    def _do_workdir(self, st: StageState, ins: df.Workdir) -> None:
        path = self._expand(ins, ins.path, st.scope())
        if not path.startswith("/"):
            path = _join(st.config.get("WorkingDir") or "/", path)
        path = os.path.normpath(path)
        self._meta_step(st, ins, lambda: st.config.__setitem__("WorkingDir", path))

    def _do_stopsignal(self, st: StageState, ins: df.Stopsignal) -> None:
        sig = self._expand(ins, ins.signal, st.scope())
        if not re.fullmatch(r"(SIG)?[A-Z0-9+-]+|\d+", sig):
            raise self._err(ins, f"STOPSIGNAL: invalid signal {sig!r}")
        self._meta_step(st, ins, lambda: st.config.__setitem__("StopSignal", sig))

    def _do_cmd(self, st: StageState, ins: df.Cmd) -> None:
        cmd = ins.command if isinstance(ins.command, list) else st.shell + [ins.command]
        self._meta_step(st, ins, lambda: st.config.__setitem__("Cmd", cmd))

    def _do_entrypoint(self, st: StageState, ins: df.Entrypoint) -> None:
        ep = ins.command if isinstance(ins.command, list) else st.shell + [ins.command]

        def apply():
            st.config["Entrypoint"] = ep
            st.config["Cmd"] = []  # an ENTRYPOINT clears the CMD it inherited
        self._meta_step(st, ins, apply)

    def _do_shell(self, st: StageState, ins: df.Shell) -> None:
        def apply():
            st.shell = list(ins.shell)
            st.config["Shell"] = list(ins.shell)
        self._meta_step(st, ins, apply)

    def _do_healthcheck(self, st: StageState, ins: df.Healthcheck) -> None:
        hc: dict = {"Test": ins.test}
        for k, v in (("Interval", ins.interval), ("Timeout", ins.timeout), ("StartPeriod", ins.start_period),
                     ("StartInterval", ins.start_interval), ("Retries", ins.retries)):
            if v:
                hc[k] = v
        self._meta_step(st, ins, lambda: st.config.__setitem__("Healthcheck", hc))

    def _do_onbuild(self, st: StageState, ins: df.Onbuild) -> None:
        def apply():
            st.config["OnBuild"] = list(st.config.get("OnBuild") or []) + [ins.trigger_text]
        self._meta_step(st, ins, apply)

    def _do_arg(self, st: StageState, ins: df.Arg) -> None:
        for name, default in ins.names:
            if name in self.opts.build_args:
                st.args[name] = self.opts.build_args[name]
            elif default is not None:
                st.args[name] = self._expand(ins, default, st.scope())
            elif name in self.global_args:
                st.args[name] = self.global_args[name]
        # buildah records the names of every arg with a value in the stage so far.
        self._meta_step(st, ins, lambda: None, "/bin/sh -c #(nop) ARG " + " ".join(sorted(st.args)))

    def _do_from(self, st: StageState, ins: df.Instruction) -> None:  # pragma: no cover - parse() forbids it
        raise self._err(ins, "FROM inside a stage")

    # RUN ------------------------------------------------------------------------------------

    def _run_args(self, st: StageState) -> dict[str, str]:
        """Declared args with values, as RUN sees them (an ENV of the same name wins)."""
        env = st.env()
        return {k: env.get(k, v) for k, v in sorted(st.args.items())}

    def _do_run(self, st: StageState, ins: df.Run) -> None:
        args = self._run_args(st)
        rest = ins.original.split(None, 1)[1] if " " in ins.original.strip() or "\t" in ins.original else ""
        prefix = f"|{len(args)} " + " ".join(f"{k}={v}" for k, v in args.items()) + " " if args else ""
        created_by = prefix + "/bin/sh -c " + rest
        if isinstance(ins.command, list):
            argv = list(ins.command)
        elif ins.heredocs and re.fullmatch(r"\d*<<-?\S+", ins.command.strip()):
            body = ins.heredocs[0].content
            if ins.heredocs[0].expand:
                pass  # the shell running the script expands it, as BuildKit leaves it to the shell
            if body.startswith("#!"):
                script = "/dev/shm/.layerdb-heredoc"
                argv = st.shell + [f"cat > {script} <<'LAYERDB_HEREDOC_EOF'\n{body}LAYERDB_HEREDOC_EOF\n"
                                   f"chmod 700 {script} && exec {script}"]
            else:
                argv = st.shell + [body]
        elif ins.heredocs:
            text = ins.command + "\n" + "".join(h.content + h.name + "\n" for h in ins.heredocs)
            argv = st.shell + [text]
        else:
            argv = st.shell + [ins.command]
        network = ins.network or self.opts.network
        if network not in ("host", "none", "default"):
            raise self._err(ins, f"RUN --network={network}: use host or none")
        workdir = st.config.get("WorkingDir") or "/"
        scope = st.scope()
        mounts = [mounts_.parse(self._expand(ins, text, scope), workdir) for text in ins.mounts]
        inputs = {"argv": argv, "args": args, "env": st.config.get("Env") or [], "user": st.config.get("User") or "",
                  "workdir": workdir, "network": network, "heredocs": [h.content for h in ins.heredocs]}
        if mounts:
            inputs["mounts"] = [self._mount_key(ins, m) for m in mounts]
        key, hit = self._cached(st, ins, inputs, layer=True)
        if self._reuse(st, ins, key, hit, created_by):
            return
        created = self._now()
        env = list(st.config.get("Env") or [])
        names = {e.partition("=")[0] for e in env}
        for k, v in args.items():
            if k not in names:
                env.append(f"{k}={v}")
        for k in PROXY_ARGS:
            if k in self.opts.build_args and k not in names and k not in args:
                env.append(f"{k}={self.opts.build_args[k]}")
        entries = self._run(st, ins, argv, env, "none" if network == "none" else "host", mounts)
        if self.timestamp is not None:
            for e in entries:
                e.mtime = self.timestamp
        try:
            diff_id = self._store_layer(st, entries, ins, keep_upper=self._last_upper)
        finally:
            if self._exported_root:
                shutil.rmtree(self._exported_root, ignore_errors=True)
                self._exported_root = None
        self._history(st, ins, created_by, False, created)
        self._remember(st, key, ins, inputs, diff_id, created)

    def _reuse(self, st: StageState, ins: df.Instruction, key: str, hit: dict | None, created_by: str) -> bool:
        """A layer step taken from the cache: its layer and history entry added."""
        if not hit:
            return False
        self._add_layer(st, hit["diff_id"])
        self._history(st, ins, created_by, False, hit["created"])
        st.key = key
        return True

    def _lowers(self, chain: list[DiffResult]) -> list[str]:
        """The chain's diffs as overlay lower directories, newest first (never fewer than two,
        as a read-only overlay needs two)."""
        base = os.path.join(self.cache_dir, "layers")
        os.makedirs(base, exist_ok=True)
        out = []
        for d in chain:
            name = cache.name_of(d.diff_id)
            path = os.path.join(base, name)
            if not os.path.isdir(path):
                with self.store.read():
                    materialize(self.store.conn, self.content, d.diff_rowid, path)
            if name not in self._used:
                cache.note(path, self._origin)
                self._used.add(name)
            out.append(path)
        empty = os.path.join(base, "empty")
        os.makedirs(empty, exist_ok=True)
        return list(reversed(out)) + [empty] * (2 - len(out) if len(out) < 2 else 0)

    # RUN --mount ------------------------------------------------------------------------

    def _mount_key(self, ins: df.Run, m: mounts_.MountSpec) -> dict:
        """A mount's part of the step's key: a bind's source by content (context) or chain
        id (stage, image); a cache or secret by name only, as docker keys them."""
        out = m.key()
        if m.type != "bind":
            return out
        if m.from_:
            chain = self._from_chain(m.from_, ins)
            out["chain"] = chain_ids([d.diff_id for d in chain])[-1] if chain else None
            return out
        src = self._bind_source(ins, m)
        rows = []
        for mem in self._bind_context.walk(src):
            e = _context_entry(mem.rel.encode("utf-8", "surrogateescape"), mem.full, mem.st)
            rows.append([mem.rel, e.type, e.mode, e.uid, e.gid, _entry_sha(e), e.link.decode("utf-8", "surrogateescape")])
        out["digest"] = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
        return out

    @property
    def _bind_context(self) -> Context:
        # A bind mount shows the context directory as it is, as buildah 1.28 binds it:
        # .dockerignore filters what COPY reads, not what a bind shows.
        return Context(self.context.root)

    def _bind_source(self, ins: df.Run, m: mounts_.MountSpec):
        if re.search(r"[*?\[]", m.source):
            raise self._err(ins, f"RUN --mount: source={m.source}: wildcards are not allowed")
        try:
            return self._bind_context.sources(m.source or ".")[0]
        except ContextError as e:
            raise self._err(ins, f"RUN --mount: {e.message}", ContextError) from None

    def _from_source(self, ins: df.Run, m: mounts_.MountSpec, view: "_ChainReader") -> Node | None:
        """What source= names in the from= view (None: its root); refused when missing or
        reached through a symlink."""
        sub = m.source.strip("/")
        if not sub:
            return None
        parts = sub.encode().split(b"/")
        n = None
        for k in range(1, len(parts) + 1):
            n = view.get(b"/".join(parts[:k]))
            if n is None:
                raise self._err(ins, f"RUN --mount: source={m.source}: no such path in {m.from_}", ContextError)
            if n.type == "l":
                raise self._err(ins, f"RUN --mount: source={m.source}: /{b'/'.join(parts[:k]).decode()}"
                                     f" is a symlink in {m.from_}; name what it points to", BuildError)
        return n

    def _cache_mount(self, ins: df.Run, m: mounts_.MountSpec) -> tuple[str, int]:
        """The host directory of a cache mount and the fd of the lock held on it for the step.

        As the reference says: `shared` (the default) lets concurrent steps use one
        directory; `locked` waits until no other step uses it; `private` takes a free
        instance of the cache (`ID`, `ID-1`, ...), making a new one when every instance
        is in use.  Each use holds a flock on its directory (shared: LOCK_SH, when no
        locked or private use holds it), which is how the others tell it is in use.
        A new cache starts empty, or with from= (and source=) as a copy of that stage's
        or image's directory, as BuildKit seeds it; a cache that exists keeps what
        earlier steps left in it."""
        base = os.path.join(self.cache_dir, "mounts", hashlib.sha256(m.id.encode()).hexdigest()[:24])
        os.makedirs(os.path.dirname(base), exist_ok=True)
        n = 0
        while True:
            d = base if n == 0 else f"{base}-{n}"
            if not os.path.isdir(d):
                self._new_cache(ins, m, d)
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                if m.sharing == "locked":
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    return d, fd
                try:
                    fcntl.flock(fd, (fcntl.LOCK_EX if m.sharing == "private" else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                except BlockingIOError:
                    if m.sharing != "private":
                        return d, fd  # shared: in use by a locked or private step, and used all the same
                    os.close(fd)
                    n += 1
                    continue
                return d, fd
            except BaseException:
                os.close(fd)
                raise

    def _new_cache(self, ins: df.Run, m: mounts_.MountSpec, d: str) -> None:
        # Named for this process: a killed build's half-made cache is removed by the next one.
        tmp = tempfile.mkdtemp(prefix=f"build-{os.getpid()}-", dir=os.path.dirname(d))
        try:
            if m.from_:
                os.rmdir(tmp)  # the copy makes it
                view = _ChainReader(self.store, self._from_chain(m.from_, ins))
                node = self._from_source(ins, m, view)
                if node is not None and node.type != "d":
                    raise self._err(ins, f"RUN --mount=type=cache: source={m.source} is not a directory in"
                                         f" {m.from_}", BuildError)
                self._copy_out(ins, m, view, node, tmp)
            os.chown(tmp, m.uid, m.gid)
            os.chmod(tmp, m.mode if m.mode is not None else 0o755)
            try:
                os.rename(tmp, d)
            except OSError:  # another build made it first: theirs is as good
                pass
        finally:
            if os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)

    def _copy_out(self, ins: df.Run, m: mounts_.MountSpec, view: "_ChainReader", node: Node | None,
                  dest: str) -> None:
        """What a mount's from= and source= name, copied into dest (new): a directory with
        everything below it, or a file."""
        from ..containers.container import subview
        from ..output.export import write_dir

        top = m.source.strip("/").encode()
        with self.store.read():
            if node is None or node.type == "d":
                write_dir(subview(list(view.subtree(top)), top), self.content, dest, allow_devices=True)
                return
            if node.type != "f":
                raise self._err(ins, f"RUN --mount: source={m.source} is a {node.type!r} entry in {m.from_},"
                                     " not a file or directory", BuildError)
            with open(dest, "xb") as f:
                if node.size:
                    for piece in self.content.iter_blob(node.blob_id):
                        f.write(piece)
        os.chown(dest, node.uid or 0, node.gid or 0)
        os.chmod(dest, node.mode or 0)

    def _step_mounts(self, ins: df.Run, specs: list[mounts_.MountSpec], step_dir: str,
                     cleanup: list[str], plain: bool = False) -> tuple[list[runtime.Mount], list[tuple[bytes, str]],
                                                                        list[int]]:
        """The host side of each mount: (what the child mounts, the mountpoints it needs, fds of held locks).
        plain: no overlay can be mounted (export, run, apply), so stages and read-write
        binds are copies."""
        out: list[runtime.Mount] = []
        points: list[tuple[bytes, str]] = []
        locks: list[int] = []
        layers = os.path.join(self.cache_dir, "layers")

        def scratch_upper() -> tuple[str, str]:
            # Writes to a read-write bind are thrown away; overlayfs wants its upper on the
            # file system the step's own upper uses (the build cache), not on /tmp.
            d = tempfile.mkdtemp(prefix=f"upper-{os.getpid()}-bind-", dir=layers)
            cleanup.append(d)
            os.mkdir(os.path.join(d, "u"))
            os.mkdir(os.path.join(d, "w"))
            return os.path.join(d, "u"), os.path.join(d, "w")

        for i, m in enumerate(specs):
            rel = m.target.strip("/").encode()
            if m.type == "tmpfs":
                out.append(runtime.Mount("tmpfs", rel, readonly=False, data=f"size={m.size}" if m.size else ""))
                points.append((rel, "d"))
            elif m.type == "cache":
                d, fd = self._cache_mount(ins, m)
                locks.append(fd)
                out.append(runtime.Mount("bind", rel, source=d, readonly=m.readonly))
                points.append((rel, "d"))
            elif m.type == "secret":
                src = self.opts.secrets.get(m.id)
                if src is None:
                    if m.required:
                        raise self._err(ins, f"RUN --mount=type=secret: no secret {m.id!r} was given (--secret"
                                             f" id={m.id},src=FILE)", BuildError)
                    continue
                try:
                    r = open(src, "rb")
                except OSError as e:
                    raise self._err(ins, f"secret {m.id!r}: cannot read {src}: {e.strerror}", BuildError) from None
                # The copy that is bound lives on tmpfs (never on a disk), for the step only;
                # a killed build's is removed by the next one.  (A memfd cannot be bound.)
                shm = SECRETS_DIR if os.path.isdir(SECRETS_DIR) else step_dir
                d = tempfile.mkdtemp(prefix=f"layerdb-secret-{os.getpid()}-", dir=shm)
                cleanup.append(d)
                copy = os.path.join(d, "s")
                fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f, r:
                    shutil.copyfileobj(r, f)
                os.chown(copy, m.uid, m.gid)
                os.chmod(copy, m.mode if m.mode is not None else 0o400)
                out.append(runtime.Mount("bind", rel, source=copy, readonly=True))
                points.append((rel, "f"))
            elif m.from_ and plain:
                # No overlay to be had: a copy of the stage's directory or file, which
                # also throws a read-write mount's writes away.
                view = _ChainReader(self.store, self._from_chain(m.from_, ins))
                node = self._from_source(ins, m, view)
                copy = os.path.join(step_dir, f"from-{i}")
                self._copy_out(ins, m, view, node, copy)
                out.append(runtime.Mount("bind", rel, source=copy, readonly=m.readonly))
                points.append((rel, "d" if node is None or node.type == "d" else "f"))
            elif m.from_:
                chain = self._from_chain(m.from_, ins)
                lowers = self._lowers(chain)
                sub = m.source.strip("/")
                view = _ChainReader(self.store, chain)
                node = self._from_source(ins, m, view)
                upper, work = scratch_upper() if not m.readonly else ("", "")
                if not sub:
                    out.append(runtime.Mount("overlay", rel, lowers=lowers, upper=upper, work=work,
                                             readonly=m.readonly))
                    points.append((rel, "d"))
                    continue
                at = os.path.join(step_dir, f"from-{i}")
                os.mkdir(at)
                out.append(runtime.Mount("overlay", at.encode(), lowers=lowers, upper=upper, work=work,
                                         readonly=m.readonly, host=True))
                out.append(runtime.Mount("bind", rel, source=os.path.join(at, sub), readonly=m.readonly))
                points.append((rel, "d" if node is not None and node.type == "d" else "f"))
            else:
                src = self._bind_source(ins, m)
                if m.readonly:
                    out.append(runtime.Mount("bind", rel, source=src.full, readonly=True))
                elif src.is_dir and plain:
                    copy = os.path.join(step_dir, f"bind-{i}")
                    shutil.copytree(src.full, copy, symlinks=True)
                    out.append(runtime.Mount("bind", rel, source=copy, readonly=False))
                elif src.is_dir:
                    upper, work = scratch_upper()
                    out.append(runtime.Mount("overlay", rel, lowers=[src.full, self._lowers([])[0]], upper=upper,
                                             work=work, readonly=False))
                else:
                    copy = os.path.join(step_dir, f"bind-{i}")
                    shutil.copy2(src.full, copy)
                    out.append(runtime.Mount("bind", rel, source=copy, readonly=False))
                points.append((rel, "d" if src.is_dir else "f"))
        return out, points, locks

    def _run(self, st: StageState, ins: df.Run, argv: list[str], env: list[str], network: str,
             mounts: list[mounts_.MountSpec] | None = None) -> list[LayerEntry]:
        assert self.tmp is not None
        mode = self._root_mode(ins, len(st.chain))
        lowers = self._lowers(st.chain) if mode != "export" else []
        step_dir = tempfile.mkdtemp(prefix="run-", dir=self.tmp)
        exported = None
        if mode == "export":
            # The root is the parent view written out, in the build's scratch space (a
            # killed build's is removed by the next one); the step runs in it in place.
            upper = os.path.join(step_dir, "root")
            exported = rootdir.export_view(self.store, self.content, [(i + 1, d.diff_rowid)
                                                                     for i, d in enumerate(st.chain)], upper)
        else:
            # The upper dir lives under the cache: it becomes this layer's lower
            # directory for the next steps without a copy (same file system: a rename).
            os.makedirs(os.path.join(self.cache_dir, "layers"), exist_ok=True)
            upper = tempfile.mkdtemp(prefix=f"upper-{os.getpid()}-", dir=os.path.join(self.cache_dir, "layers"))
        cleanup = [upper]
        locks: list[int] = []
        try:
            os.chmod(upper, 0o755)  # the upper's own mode is the root's in the merged view
            work, merged = os.path.join(step_dir, "w"), os.path.join(step_dir, "m") if not exported else upper
            os.mkdir(work)
            if not exported:
                os.mkdir(merged)
            view = _ChainReader(self.store, st.chain)
            cwd = st.config.get("WorkingDir") or "/"
            # WORKDIR's directory is made by the step that first needs it, so it lands in this
            # layer; before the mountpoints, so that a mount below it does not take it away.
            if cwd != "/" and view.get(cwd.strip("/").encode()) is None:
                _make_dirs_in_upper(upper, cwd.strip("/").encode(), view)
            step_mounts, points, locks = self._step_mounts(ins, mounts or [], step_dir, cleanup, mode == "export")
            points = ([(rel, "d") for rel in runtime.MOUNT_DIRS] + [(rel, "f") for rel in runtime.MOUNT_FILES]
                      + points)
            stubs = self._make_stubs(view, upper, points, ins)
            # In an exported root, making a mountpoint changes its directory's mtime, which
            # would put the directory in the layer: what it was is put back afterwards.
            stub_dirs = {} if not exported else _stub_parents(upper, stubs, exported[1])
            etc = self._etc_files(step_dir)
            uid, gid, groups = self._user(view, st.config.get("User") or "", ins)
            spec = runtime.RunSpec(argv=argv, env=env, lowers=lowers, upper=upper, work=work,
                                   merged=merged, etc_files=etc, cwd=cwd, uid=uid, gid=gid, groups=groups,
                                   network=network, hostname=hashlib.sha256(st.key.encode()).hexdigest()[:12],
                                   mounts=step_mounts, fuse=mode == "fuse", plain=mode == "export")
            tail: list[bytes] = [b""]

            def output(b: bytes) -> None:
                self.say("output", b.decode("utf-8", "replace"))
                lines = (tail[-1] + b).split(b"\n")
                tail[-1:] = lines
                del tail[:-OUTPUT_TAIL - 1]

            status = runtime.run(spec, output)
            shutil.rmtree(work, ignore_errors=True)
            if status != 0:
                last = b"\n".join(x for x in tail if x).decode("utf-8", "replace")
                raise StepFailed(f"{self.df.path}:{ins.line}: {ins.original}: exited with status {status}"
                                 + (f"; its last output:\n{last}" if last else ""), ins.original, status, last)
            if exported:
                ran = {d: os.lstat(d).st_mtime_ns for d in stub_dirs}
                self._remove_stubs(upper, stubs)
                for d, (before, made) in stub_dirs.items():
                    # Untouched by the step: as exported; else as the step left it.
                    t = before if ran[d] == made else ran[d]
                    os.utime(d, ns=(t, t), follow_symlinks=False)
                entries = rootdir.layer_entries(upper, *exported)
                cleanup.remove(upper)  # its files are the layer's bytes: removed once it is stored
                self._exported_root = upper
                return entries
            self._remove_stubs(upper, stubs)
            cleanup.remove(upper)
            self._last_upper = upper
            # An opaque mark hides what is below: over nothing (fuse-overlayfs marks every
            # new directory so) it says nothing, and the kernel's overlay leaves it out.
            return [e for e in upper_entries(upper)
                    if e.type != "opq" or getattr(view.get(e.path), "type", None) == "d"]
        finally:
            for fd in locks:
                os.close(fd)
            for d in cleanup:
                shutil.rmtree(d, ignore_errors=True)

    _last_upper: str | None = None
    _exported_root: str | None = None
    _kernel_overlay: str | None = ""  # "": not probed yet; None: it mounts; else why not
    _said_fallback = False

    def _root_mode(self, ins: df.Run, layers: int) -> str:
        """The root a RUN gets: "kernel", "fuse" or "export" (see the module docstring);
        BuildOptions.overlay, else $LAYERDB_BUILD_ROOT, can force one."""
        assert self.tmp is not None
        forced = self.root_mode
        if forced != "auto":
            return forced
        if self._kernel_overlay == "":
            self._kernel_overlay = runtime.overlay_works(os.path.join(self.tmp, "probe"))
        why = self._kernel_overlay
        lowers = max(layers, 2)
        if why is None and lowers > runtime.OVERLAY_MAX_LOWERS:
            why = f"{lowers} lower layers, over its limit of {runtime.OVERLAY_MAX_LOWERS}"
        if why is None:
            return "kernel"
        mode = "fuse" if runtime.fuse_overlayfs() is not None else "export"
        if not self._said_fallback:
            self._said_fallback = True
            self.say("info", f"RUN: kernel overlayfs cannot be used ({why}); using fuse-overlayfs" if mode == "fuse"
                     else f"RUN: kernel overlayfs cannot be used ({why}) and fuse-overlayfs is not installed;"
                          " each RUN exports its root, runs there and applies the difference (slower: the whole"
                          " view per step)")
        return mode

    def _make_stubs(self, view: "_ChainReader", upper: str, points: list[tuple[bytes, str]],
                    ins: df.Instruction) -> list[tuple[bytes, str, tuple | None]]:
        """Create in the upper dir the mountpoints (and their parents) the view lacks, each
        a directory ("d") or a file ("f"); returns what to remove afterwards."""
        made: list[tuple[bytes, str, tuple | None]] = []
        root = os.fsencode(upper)
        for rel, kind in points:
            parts = rel.split(b"/")
            for i in range(1, len(parts)):
                p = b"/".join(parts[:i])
                full = os.path.join(root, p)
                if os.path.lexists(full):
                    continue
                pn = view.get(p)
                if pn is None:
                    os.mkdir(full, 0o755)
                    os.chmod(full, 0o755)
                    made.append((p, "d", None))
                elif pn.type == "d":
                    os.mkdir(full)
                    os.chown(full, pn.uid or 0, pn.gid or 0)
                    os.chmod(full, pn.mode or 0o755)
                    os.utime(full, (pn.mtime or 0, pn.mtime or 0))
                    made.append((p, "copy", (pn.mode, pn.uid, pn.gid, pn.mtime)))
                else:
                    # Mounting through a symlink would resolve it on the host, not in the image.
                    raise self._err(ins, f"cannot mount on /{rel.decode('utf-8', 'replace')}: /{p.decode('utf-8', 'replace')}"
                                         " is not a directory in the image", BuildError)
            full = os.path.join(root, rel)
            if os.path.lexists(full):
                continue
            n = view.get(rel)
            if n is not None and n.type == kind:
                continue
            if kind == "d":
                os.mkdir(full, 0o755)
                os.chmod(full, 0o755)
            else:
                open(full, "wb").close()
            made.append((rel, kind, None))
        return made

    def _remove_stubs(self, upper: str, made: list[tuple[bytes, str, tuple | None]]) -> None:
        root = os.fsencode(upper)
        for rel, kind, meta in reversed(made):
            full = os.path.join(root, rel)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            if kind == "f":
                if stat.S_ISREG(st.st_mode) and st.st_size == 0:
                    os.unlink(full)
            elif kind == "d":
                if stat.S_ISDIR(st.st_mode) and not os.listdir(full):
                    os.rmdir(full)
            elif kind == "copy":
                # A copy of a lower directory made only to hold a mountpoint: gone
                # unless the step put something in it or changed its attributes.
                mode, uid, gid, _ = meta
                if (not os.listdir(full) and stat.S_IMODE(st.st_mode) == (mode or 0) and st.st_uid == (uid or 0)
                        and st.st_gid == (gid or 0)):
                    os.rmdir(full)

    def _etc_files(self, step_dir: str) -> dict[bytes, str]:
        out = {}
        hostname = "layerdb"
        for rel, text in ((b"etc/hosts", f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost\n"),
                          (b"etc/hostname", hostname + "\n")):
            p = os.path.join(step_dir, rel.decode().replace("/", "_"))
            with open(p, "w") as f:
                f.write(text)
            out[rel] = p
        p = os.path.join(step_dir, "resolv.conf")
        try:
            shutil.copyfile("/etc/resolv.conf", p)
        except OSError:
            open(p, "w").close()
        out[b"etc/resolv.conf"] = p
        return out

    def _user(self, view: "_ChainReader", user: str, ins: df.Instruction) -> tuple[int, int, list[int]]:
        if not user:
            return 0, 0, []
        name, _, group = user.partition(":")
        passwd = _table(view.read(b"etc/passwd"))
        groups = _table(view.read(b"etc/group"))
        if name.isdigit():
            uid = int(name)
            row = next((r for r in passwd if len(r) > 3 and r[2] == name), None)
        else:
            row = next((r for r in passwd if r and r[0] == name), None)
            if row is None or len(row) < 4:
                raise self._err(ins, f"USER {user}: no user {name!r} in the image's /etc/passwd", StepFailed)
            uid = int(row[2])
        if group:
            gid = self._group(groups, group, ins)
        else:
            gid = int(row[3]) if row is not None and len(row) > 3 and row[3].isdigit() else 0
        extra = sorted({int(g[2]) for g in groups if len(g) > 3 and g[2].isdigit()
                        and row is not None and row[0] in g[3].split(",")} | {gid})
        return uid, gid, extra

    def _group(self, groups: list[list[str]], group: str, ins: df.Instruction) -> int:
        if group.isdigit():
            return int(group)
        g = next((r for r in groups if r and r[0] == group), None)
        if g is None or len(g) < 3:
            raise self._err(ins, f"no group {group!r} in the image's /etc/group", StepFailed)
        return int(g[2])

    # COPY and ADD -------------------------------------------------------------------------------

    def _do_copy(self, st: StageState, ins: df.Copy) -> None:
        self._copy(st, ins, "COPY")

    def _do_add(self, st: StageState, ins: df.Add) -> None:
        self._copy(st, ins, "ADD")

    def _owner(self, st: StageState, view: "_ChainReader", ins: df.CopyBase) -> tuple[int, int] | None:
        if not ins.chown:
            return None
        spec = self._expand(ins, ins.chown, st.scope())
        user, _, group = spec.partition(":")
        passwd = None
        if user.isdigit():
            uid = int(user)
        else:
            if ins.link:
                raise self._err(ins, f"--chown={spec}: with --link, names cannot be looked up: use numbers")
            passwd = _table(view.read(b"etc/passwd"))
            row = next((r for r in passwd if r and r[0] == user), None)
            if row is None or len(row) < 4:
                raise self._err(ins, f"--chown={spec}: no user {user!r} in the image's /etc/passwd", StepFailed)
            uid = int(row[2])
        if not group:
            return uid, uid
        if group.isdigit():
            return uid, int(group)
        if ins.link:
            raise self._err(ins, f"--chown={spec}: with --link, names cannot be looked up: use numbers")
        return uid, self._group(_table(view.read(b"etc/group")), group, ins)

    def _copy(self, st: StageState, ins: df.CopyBase, kind: str) -> None:
        scope = st.scope()
        parents = isinstance(ins, df.Copy) and ins.parents
        exclude = Ignore([self._expand(ins, x, scope) for x in ins.excludes]) if ins.excludes else None
        checksum = self._expand(ins, ins.checksum, scope) if isinstance(ins, df.Add) and ins.checksum else None
        if checksum is not None:
            alg, _, hexd = checksum.partition(":")
            if alg not in ("sha256", "sha384", "sha512") or not re.fullmatch(r"[0-9a-f]+", hexd) \
                    or len(hexd) != hashlib.new(alg).digest_size * 2:
                raise self._err(ins, f"ADD --checksum={checksum}: expected sha256:<64 hex digits> (or sha384, sha512)")
        dest_word = self._expand(ins, ins.dest, scope)
        workdir = st.config.get("WorkingDir") or "/"
        dest = dest_word if dest_word.startswith("/") else _join(workdir, dest_word)
        view = _ChainReader(self.store, st.chain)
        owner = self._owner(st, view, ins)
        chmod = self._expand(ins, ins.chmod, scope) if ins.chmod else None
        if chmod is not None:
            _chmod(0o644, chmod, False)  # refuse a bad mode before anything is read
        created = self._now()
        now_t = self.timestamp if self.timestamp is not None else int(time.time())
        from_ref = ins.flag("from") if isinstance(ins, df.Copy) else None
        source_view: _ChainReader | None = None
        if from_ref:
            source_view = _ChainReader(self.store, self._from_chain(self._expand(ins, from_ref, scope), ins))
        items: list[tuple[str, object]] = []  # (kind, what) per source
        for w in ins.sources:
            doc = ins.heredoc(w)
            if doc is not None:
                items.append(("heredoc", doc))
                continue
            src = self._expand(ins, w, scope)
            if isinstance(ins, df.Add) and re.match(r"^https?://", src):
                items.append(("url", src))
                continue
            if checksum is not None:
                raise self._err(ins, f"ADD --checksum: {src} is not a URL (only http and https sources take one)")
            pivot = _pivot(src, self.context.clean) if parents else None
            if source_view is not None:
                items.append(("view", (src, pivot)))
            else:
                try:
                    for s in self.context.sources(src):
                        items.append(("context", (s, None if pivot is None else "/".join(s.rel.split("/")[pivot:]))))
                except ContextError as e:
                    raise self._err(ins, e.message, ContextError) from None
        wildcard = any(re.search(r"[*?\[]", w) for w in ins.sources)
        dest_dir = dest_word.endswith("/") or len(items) > 1 or wildcard or parents
        dest_rel = dest.strip("/").encode()
        if not dest_dir:
            n = view.get(dest_rel)
            dest_dir = n is not None and n.type == "d"
        entries: list[LayerEntry] = []
        summary: list = []

        def owned(e: LayerEntry, mode_change: bool = True) -> LayerEntry:
            if owner is not None:
                e.uid, e.gid = owner
            if chmod is not None and mode_change and e.type not in ("l", "h", "wh", "opq"):
                e.mode = _chmod(e.mode, chmod, e.type == "d")
            if self.timestamp is not None:
                e.mtime = self.timestamp
            return e

        kinds = []
        for what, item in items:
            if what == "heredoc":
                doc = item  # type: ignore[assignment]
                body = doc.content if not doc.expand else self._expand(ins, _quote_free(doc.content), scope)
                target = _join(dest, doc.name) if dest_dir else dest
                data = body.encode()
                entries.append(owned(LayerEntry(target.strip("/").encode(), "f", 0o644, mtime=now_t, size=len(data),
                                                data=data)))
                kinds.append("file")
            elif what == "url":
                entries.append(owned(self._fetch(str(item), dest, dest_dir, now_t, ins, checksum)))
                kinds.append("file")
            elif what == "view":
                assert source_view is not None
                vsrc, pivot = item  # type: ignore[misc]
                got = self._from_stage_entries(source_view, vsrc, dest, dest_dir, ins, pivot, exclude)
                entries += [owned(e) for e in got]
                kinds.append("dir" if len(got) > 1 else "file")
            else:
                s, keep = item  # type: ignore[misc]
                if exclude is not None and not s.is_dir and exclude.ignored(os.path.basename(s.rel)):
                    continue
                if isinstance(ins, df.Add) and not s.is_dir and _archive_kind(s.full):
                    got = self._extract(s.full, dest, ins)
                    entries += [owned(e) if owner or self.timestamp is not None else e for e in got]
                    kinds.append("file")
                    continue
                if keep is not None:  # --parents: the source's path below the pivot is kept
                    base = _join(dest, keep) if keep else dest
                else:
                    base = dest if (s.is_dir or not dest_dir) else _join(dest, os.path.basename(s.full))
                for m in self.context.walk(s):
                    if exclude is not None and m.rel and exclude.ignored(m.rel):
                        continue
                    rel = (_join(base, m.rel) if m.rel else base).strip("/").encode()
                    if not rel and s.is_dir:
                        continue
                    if not m.rel and s.is_dir:
                        # The source directory itself: only its contents are copied; the
                        # destination directory keeps what it is, or is made.
                        continue
                    entries.append(owned(_context_entry(rel, m.full, m.st)))
                kinds.append("dir" if s.is_dir else "file")
        # Parents: those the view has go in as they are; missing ones are made (0755, owned as --chown).
        have = {e.path for e in entries}
        parents = set()
        targets = [e.path for e in entries]
        if any(k == "dir" for k in kinds) or dest_dir:
            targets.append(dest_rel + b"/x")
        for p in targets:
            parts = p.split(b"/")
            for i in range(1, len(parts)):
                parents.add(b"/".join(parts[:i]))
        for p in sorted(parents - have):
            if not p:
                continue
            n = None if ins.link else view.get(p)
            if n is not None and n.type == "d":
                entries.append(LayerEntry(p, "d", n.mode or 0o755, n.uid or 0, n.gid or 0, n.mtime or 0,
                                          xattrs=n.xattr_dict()))
            else:
                e = LayerEntry(p, "d", 0o755, 0, 0, now_t)
                if owner is not None:
                    e.uid, e.gid = owner
                entries.append(e)
        for e in entries:
            summary.append([e.path.decode("utf-8", "surrogateescape"), e.type, e.mode, e.uid, e.gid,
                            _entry_sha(e), e.link.decode("utf-8", "surrogateescape")])
        summary.sort()
        digest = hashlib.sha256(json.dumps(summary).encode()).hexdigest()
        what = kinds[0] if len(kinds) == 1 else "multi"
        created_by = f"/bin/sh -c #(nop) {kind} {what}:{digest} in {dest_word} "
        inputs = {"sources": {"/" + row[0]: f"{row[1]} {row[2]:o} {row[3]}:{row[4]} {row[5]}" for row in summary},
                  "from": source_view.chain_id if source_view else None}
        key, hit = self._cached(st, ins, inputs, layer=True)
        if self._reuse(st, ins, key, hit, created_by):
            return
        diff_id = self._store_layer(st, entries, ins)
        self._history(st, ins, created_by, False, created)
        self._remember(st, key, ins, inputs, diff_id, created)

    def _from_chain(self, ref: str, ins: df.Instruction) -> list[DiffResult]:
        """The layers `--from` names: another stage (built first) or a stored image."""
        stage = self.df.stage(ref)
        if stage is not None and stage is not self._current_stage(ins):
            return self._stage(stage.index).chain
        with self.store.read():
            try:
                r = refs.resolve(self.store, ref)
            except NotFound:
                raise self._err(ins, f"--from={ref}: no stage or stored image of that name", BuildError) from None
        return [DiffResult(li.diff_rowid, li.diff_id, new=False) for li in r.layers]

    def _current_stage(self, ins: df.Instruction) -> df.Stage | None:
        return next((s for s in self.df.stages if ins in s.instructions), None)

    def _from_stage_entries(self, view: "_ChainReader", src: str, dest: str, dest_dir: bool,
                            ins: df.Instruction, pivot: int | None = None,
                            exclude: Ignore | None = None) -> list[LayerEntry]:
        parts = [p for p in src.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise self._err(ins, f"--from source {src}: '..' is not allowed")
        rel = b"/".join(p.encode() for p in parts)
        node = view.get(rel, follow=True)
        if node is None:
            raise self._err(ins, f"{src}: no such file or directory in the --from image", ContextError)
        if pivot is not None:  # --parents: the path below the pivot is kept
            dest = _join(dest, "/".join(parts[pivot:]))
        out: list[LayerEntry] = []
        if node.type != "d":
            if exclude is not None and exclude.ignored(parts[-1] if parts else ""):
                return out
            target = dest if pivot is not None else _join(dest, os.path.basename(src.rstrip("/"))) if dest_dir else dest
            out.append(_node_entry(target.strip("/").encode(), node))
            return out
        first: dict[int, bytes] = {}
        for p, n in view.subtree(rel):
            sub = p[len(rel) + 1:] if rel else p
            if not sub:
                continue
            if exclude is not None and exclude.ignored(sub.decode("utf-8", "surrogateescape")):
                continue
            target = (_join(dest, sub.decode("utf-8", "surrogateescape"))).strip("/").encode()
            if n.type != "d" and id(n) in first:
                out.append(LayerEntry(target, "h", n.mode or 0, n.uid or 0, n.gid or 0, n.mtime or 0,
                                      link=first[id(n)]))
                continue
            if n.type != "d":
                first[id(n)] = target
            out.append(_node_entry(target, n))
        return out

    def _fetch(self, url: str, dest: str, dest_dir: bool, now_t: int, ins: df.Instruction,
               checksum: str | None = None) -> LayerEntry:
        assert self.tmp is not None
        name = os.path.basename(urllib.parse.urlparse(url).path) or "index.html"
        target = _join(dest, name) if dest_dir else dest
        fd, path = tempfile.mkstemp(dir=self.tmp, prefix="url-")
        h = hashlib.new(checksum.partition(":")[0] if checksum else "sha256")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                while b := resp.read(1 << 20):
                    h.update(b)
                    out.write(b)
                modified = resp.headers.get("Last-Modified")
        except OSError as e:
            raise self._err(ins, f"{url}: cannot fetch it: {getattr(e, 'reason', None) or e}", StepFailed) from None
        if checksum is not None and h.hexdigest() != checksum.partition(":")[2]:
            raise self._err(ins, f"{url}: digest mismatch: expected {checksum}, got {h.name}:{h.hexdigest()}",
                            BuildError)
        mtime = now_t
        if modified:
            import email.utils

            try:
                mtime = int(email.utils.parsedate_to_datetime(modified).timestamp())
            except (TypeError, ValueError):
                pass
        return LayerEntry(target.strip("/").encode(), "f", 0o600, mtime=mtime, size=os.path.getsize(path),
                          source=path)

    def _extract(self, archive: str, dest: str, ins: df.Instruction) -> list[LayerEntry]:
        """A local archive unpacked below dest, through layerdb's own tar reader."""
        assert self.tmp is not None
        kind = _archive_kind(archive)
        opener = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open, "tar": open}.get(kind or "")
        spool = tempfile.mkdtemp(dir=self.tmp, prefix="add-")
        out: list[LayerEntry] = []
        base = dest.strip("/").encode()
        if kind == "zstd":
            import zstandard

            raw = open(archive, "rb")
            f = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
        else:
            assert opener is not None
            f = opener(archive, "rb")
        try:
            reader = TarReader(f)
            for i, e in enumerate(reader):
                parts = [p for p in e.name.split(b"/") if p and p != b"."]
                if b".." in parts:
                    raise self._err(ins, f"{os.path.basename(archive)}: a member escapes the destination:"
                                         f" {e.name.decode('utf-8', 'replace')}", BuildError)
                rel = b"/".join([base] + parts if base else parts)
                if not rel:
                    continue
                le = LayerEntry(rel, e.type, e.mode, e.uid, e.gid, e.mtime, xattrs=dict(e.xattrs))
                if e.type == "f":
                    p = os.path.join(spool, str(i))
                    with open(p, "wb") as w:
                        for piece in reader.payload():
                            w.write(piece)
                    le.size, le.source = e.size, p
                elif e.type == "l":
                    le.link = e.linkname
                elif e.type == "h":
                    tparts = [p for p in e.linkname.split(b"/") if p and p != b"."]
                    le.link = b"/".join([base] + tparts if base else tparts)
                elif e.type in ("c", "b"):
                    le.devmajor, le.devminor = e.devmajor, e.devminor
                out.append(le)
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise self._err(ins, f"{os.path.basename(archive)}: cannot unpack it: {e}", BuildError) from None
        except LayerdbError as e:
            if isinstance(e, BuildError):
                raise
            raise self._err(ins, f"{os.path.basename(archive)}: {e.message}", BuildError) from None
        finally:
            f.close()
        return out

    # Layers and the image ---------------------------------------------------------------------

    def _add_layer(self, st: StageState, diff_id: str) -> None:
        with self.store.read():
            rowid = self.store.scalar("SELECT id FROM diff WHERE diff_id = ?", (diff_id,))
        st.chain.append(DiffResult(rowid, diff_id, new=False))
        st.cfg.setdefault("rootfs", {"type": "layers"}).setdefault("diff_ids", []).append(diff_id)

    def _store_layer(self, st: StageState, entries: list[LayerEntry], ins: df.Instruction,
                     keep_upper: str | None = None) -> str:
        assert self.tmp is not None
        with tempfile.TemporaryFile(dir=self.tmp, prefix="layer-") as f:
            diff_id, _ = write_layer(entries, self.content, f)
            f.seek(0)
            self.content.reset()
            imp = Importer(self.store, self.content)
            try:
                with self.store.write():
                    self.store.execute("PRAGMA defer_foreign_keys = ON")
                    d = imp.ingest_tar(f, diff_id, f"the layer of {ins.original[:60]!r}")
                    self.content.flush()
            except BaseException:
                self.content.reset()
                raise
        if keep_upper:
            name = cache.name_of(diff_id)
            target = os.path.join(self.cache_dir, "layers", name)
            if os.path.isdir(target):
                shutil.rmtree(keep_upper, ignore_errors=True)
                cache.note(target, self._origin)
            else:
                os.rename(keep_upper, target)
                cache.note(target, self._origin, sum(e.size for e in entries if e.type == "f"))
            self._used.add(name)
            self._last_upper = None
        st.chain.append(DiffResult(d.diff_rowid, diff_id, new=d.new))
        st.cfg.setdefault("rootfs", {"type": "layers"}).setdefault("diff_ids", []).append(diff_id)
        return diff_id

    def _finish(self, st: StageState) -> BuildResult:
        cfg = _ordered_config(st.cfg, [d.diff_id for d in st.chain])
        config = json.dumps(cfg, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        digest = "sha256:" + hashlib.sha256(config).hexdigest()
        imp = Importer(self.store, self.content)
        with self.store.write():
            img = imp.store_image(digest, config, cfg, st.chain, list(self.opts.tags))
        self.result.id = digest
        self.result.layers = len(st.chain)
        self.result.new_image = img["new"]
        self.result.layer_id = chain_ids([d.diff_id for d in st.chain])[-1] if st.chain else None
        return self.result


# Reading the view below a step ----------------------------------------------------------


class _ChainReader:
    """Paths of a chain's view, looked up without replaying the whole chain."""

    def __init__(self, store: Store, chain: list[DiffResult]):
        self.store = store
        self.chain = [(i + 1, d.diff_rowid) for i, d in enumerate(chain)]
        self.chain_id = chain_ids([d.diff_id for d in chain])[-1] if chain else None
        self._content: ContentStore | None = None

    def get(self, path: bytes, follow: bool = False) -> Node | None:
        if not path:
            return Node("d", 0o755, 0, 0, 0, None, None, None, None, None, None, None, 0)
        if not self.chain:
            return None
        with self.store.read():
            view = View().replay(decided_events(self.store, [self.chain], [path])[0])
        node = view.get(path)
        if follow and node is not None and node.type == "l":
            for _ in range(40):
                target = node.link or b""
                base = path.rsplit(b"/", 1)[0] if b"/" in path else b""
                path = os.path.normpath(b"/" + (target if target.startswith(b"/") else base + b"/" + target))
                path = path.lstrip(b"/")
                node = self.get(path)
                if node is None or node.type != "l":
                    break
        return node

    def read(self, path: bytes) -> bytes:
        node = self.get(path, follow=True)
        if node is None or node.type != "f" or not node.size:
            return b""
        from ..chunks import SqliteChunkStore

        content = ContentStore(self.store.conn, SqliteChunkStore(self.store.conn))
        try:
            with self.store.read():
                return b"".join(content.iter_blob(node.blob_id))
        finally:
            content.close()

    def subtree(self, top: bytes) -> Iterator[tuple[bytes, Node]]:
        """The view below top, from the events on its paths only (COPY --from of one
        directory does not replay the whole source image)."""
        if not self.chain:
            return
        with self.store.read():
            known = below(self.store, self.chain, top)
            events = decided_events(self.store, [self.chain], [top] if top else [], known=known)[0]
        yield from View().replay(events).walk(top)


# Helpers ----------------------------------------------------------------------------------


def _parse_platform(text: str) -> tuple[str, str, str | None]:
    from ..registry import manifest

    return manifest.parse_platform(text)


def _config_platform(cfg: dict) -> tuple[str, str, str | None]:
    from ..registry import manifest

    return manifest.normalize(str(cfg.get("os") or ""), str(cfg.get("architecture") or ""), cfg.get("variant"))


def _index_platform(index: bytes, digest: str) -> tuple[str, str, str | None] | None:
    from ..registry import manifest

    try:
        doc = json.loads(index)
    except ValueError:
        return None
    for d in doc.get("manifests") or []:
        p = d.get("platform") if isinstance(d, dict) else None
        if d.get("digest") == digest and isinstance(p, dict):
            return manifest.normalize(str(p.get("os") or ""), str(p.get("architecture") or ""), p.get("variant"))
    return None


def _show_platform(p: tuple[str, str, str | None] | None) -> str:
    return "/".join(x for x in (p or ()) if x)


def _pivot(src: str, clean: Callable[[str], list[str]]) -> int:
    """COPY --parents: how many leading components of src are dropped, those before a
    `/./` (none without one; a leading `./` is no pivot)."""
    body = src[2:] if src.startswith("./") else src
    i = body.find("/./")
    return len(clean(body[:i])) if i >= 0 else 0


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _config_id(cfg: dict) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def _join(base: str, rel: str) -> str:
    out = os.path.normpath(os.path.join(base or "/", rel))
    return out if out.startswith("/") else "/" + out


def _quote_free(text: str) -> str:
    """A heredoc body for substitution: quotes stay literal (only $ and the escape act)."""
    return text.replace("\\", "\\\\").replace("'", "\\'").replace('"', '\\"')


def _table(data: bytes) -> list[list[str]]:
    return [ln.split(":") for ln in data.decode("utf-8", "replace").splitlines() if ln and not ln.startswith("#")]


def _make_dirs_in_upper(upper: str, rel: bytes, view: _ChainReader) -> None:
    root = os.fsencode(upper)
    parts = rel.split(b"/")
    for i in range(1, len(parts) + 1):
        p = b"/".join(parts[:i])
        full = os.path.join(root, p)
        n = view.get(p)
        if n is not None and n.type == "d":
            if not os.path.isdir(full):
                os.mkdir(full)
                os.chown(full, n.uid or 0, n.gid or 0)
                os.chmod(full, n.mode or 0o755)
                os.utime(full, (n.mtime or 0, n.mtime or 0))
            continue
        if not os.path.isdir(full):
            os.mkdir(full, 0o755)
            os.chmod(full, 0o755)


def _stub_parents(root: str, stubs: list[tuple[bytes, str, tuple | None]], snap: dict) -> dict[bytes, tuple[int, int]]:
    """The exported directories in which mountpoints were made: host path -> (mtime
    as exported, mtime once the mountpoints were there), in ns (the root aside: it is
    never in a layer)."""
    made = {rel for rel, _, _ in stubs}
    out: dict[bytes, tuple[int, int]] = {}
    for rel, _, _ in stubs:
        up = rel.rpartition(b"/")[0]
        if up and up not in made and up in snap:
            full = os.path.join(os.fsencode(root), up)
            out[full] = (snap[up][2], os.lstat(full).st_mtime_ns)
    return out


def _archive_kind(path: str) -> str | None:
    with open(path, "rb") as f:
        head = f.read(512)
    for magic, kind in ARCHIVE_MAGIC:
        if head.startswith(magic):
            return kind
    if len(head) == 512 and head[257:262] == b"ustar":
        return "tar"
    return None


def _context_entry(rel: bytes, full: str, st: os.stat_result) -> LayerEntry:
    from .layers import host_entry

    e = host_entry(rel, full, st)
    e.uid = e.gid = 0  # without --chown, files are root's (the builder's own ids do not leak in)
    return e


def _node_entry(path: bytes, n: Node) -> LayerEntry:
    e = LayerEntry(path, n.type, n.mode or 0, n.uid or 0, n.gid or 0, n.mtime or 0, xattrs=n.xattr_dict())
    if n.type == "f":
        e.size, e.blob_id = n.size or 0, n.blob_id
    elif n.type == "l":
        e.link = n.link or b""
    elif n.type in ("c", "b"):
        e.devmajor, e.devminor = n.devmajor or 0, n.devminor or 0
    return e


def _entry_sha(e: LayerEntry) -> str:
    if e.type != "f":
        return ""
    h = hashlib.sha256()
    if e.data is not None:
        h.update(e.data)
    elif e.source is not None:
        with open(e.source, "rb") as f:
            while b := f.read(1 << 20):
                h.update(b)
    else:
        return f"blob:{e.blob_id}"
    return h.hexdigest()


_SYMBOLIC = re.compile(r"^([ugoa]*)([-+=])([rwxXst]*|[ugo])$")


def _chmod(mode: int, spec: str, is_dir: bool) -> int:
    """--chmod: octal (`640`) or symbolic (`u+x,g-w,o=r`, as chmod(1))."""
    if re.fullmatch(r"[0-7]{1,4}", spec):
        return int(spec, 8)
    out = mode
    for clause in spec.split(","):
        m = _SYMBOLIC.match(clause)
        if not m:
            raise DockerfileError(f"--chmod={spec}: not an octal or symbolic mode")
        who, op, perms = m.groups()
        who = who or "a"
        if "a" in who:
            who = "ugo"
        bits = 0
        if perms in ("u", "g", "o"):
            src = {"u": (out >> 6) & 7, "g": (out >> 3) & 7, "o": out & 7}[perms]
            for w in who:
                bits |= src << {"u": 6, "g": 3, "o": 0}[w]
        else:
            for p in perms:
                for w in who:
                    shift = {"u": 6, "g": 3, "o": 0}[w]
                    if p == "r":
                        bits |= 4 << shift
                    elif p == "w":
                        bits |= 2 << shift
                    elif p == "x" or (p == "X" and (is_dir or mode & 0o111)):
                        bits |= 1 << shift
                    elif p == "s" and w in "ug":
                        bits |= 0o4000 if w == "u" else 0o2000
                    elif p == "t":
                        bits |= 0o1000
        if op == "+":
            out |= bits
        elif op == "-":
            out &= ~bits
        else:
            mask = 0
            for w in who:
                mask |= 7 << {"u": 6, "g": 3, "o": 0}[w]
                mask |= {"u": 0o4000, "g": 0o2000, "o": 0o1000}[w]
            out = (out & ~mask) | bits
    return out


def _difference(old: dict, new: dict) -> str:
    """What changed between two steps' inputs, in a few words."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    if sub not in a:
                        out.append(f"{k} {sub} added")
                    elif sub not in b:
                        out.append(f"{k} {sub} removed")
                    else:
                        out.append(f"{k} {sub} changed ({_short(a.get(sub))} -> {_short(b.get(sub))})")
        else:
            out.append(f"{k} changed ({_short(a)} -> {_short(b)})")
    return "; ".join(out[:5]) + ("; ..." if len(out) > 5 else "") if out else "its inputs changed"


def _short(v) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."


CONFIG_ORDER = ("Hostname", "Domainname", "User", "AttachStdin", "AttachStdout", "AttachStderr", "ExposedPorts",
                "Tty", "OpenStdin", "StdinOnce", "Env", "Cmd", "Healthcheck", "ArgsEscaped", "Image", "Volumes",
                "WorkingDir", "Entrypoint", "OnBuild", "Labels", "StopSignal", "Shell")


def _ordered_config(cfg: dict, diff_ids: list[str]) -> dict:
    """The image config as buildah's docker format orders it (no random Hostname:
    two builds of the same inputs give the same id)."""
    c = dict(cfg.get("config") or {})
    inner: dict = {}
    for k in CONFIG_ORDER:
        if k in c and c[k] not in (None, "", [], {}) or k in ("Env",):
            if k in c:
                inner[k] = c[k]
    for k, v in c.items():
        if k not in inner and k not in CONFIG_ORDER and v not in (None, "", [], {}):
            inner[k] = v
    out: dict = {"created": cfg.get("created") or iso(0)}
    if cfg.get("author"):
        out["author"] = cfg["author"]
    out["config"] = inner
    out["architecture"] = cfg.get("architecture")
    out["os"] = cfg.get("os")
    if cfg.get("variant"):
        out["variant"] = cfg["variant"]
    out["rootfs"] = {"type": "layers", "diff_ids": list(diff_ids)}
    out["history"] = cfg.get("history") or []
    return out
