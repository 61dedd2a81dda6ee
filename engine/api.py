"""The library's front door: one LayerDB per store file.

Every method returns values or writes to a stream it is given; nothing here
prints.  The CLI (layerdb.cli) is one client of this class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, BinaryIO, Callable, Iterator

from . import refs
from .errors import NotFound, UsageError
from .paths import parse_path, show_path
from .reader import TYPE_NAMES, Reader, node_dict
from .replay import View, below, decided_events

if TYPE_CHECKING:  # the importer and exporter pull in tarfile and more: loaded when used
    from .ingest.importer import ImportResult, Progress



class LayerDB(Reader):
    """The store's commands.  Reading (resolve, view, lookup) is Reader's."""

    # Import ---------------------------------------------------------------

    def import_archive(self, archive: str, tag: str | None = None, platform: str | None = None,
                       progress: Progress | None = None) -> ImportResult:
        from .ingest.importer import Importer

        return Importer(self.store, self.content, progress).import_archive(archive, tag, platform)

    # Listing --------------------------------------------------------------

    def images(self) -> list[dict]:
        out = []
        with self.store.read():
            for rowid, digest, top, created in self.store.execute(
                "SELECT id, digest, top_layer, created FROM image ORDER BY created DESC, digest"
            ).fetchall():
                chain = refs.chain_of(self.store, top) if top is not None else []
                size = 0
                for li in chain:
                    size += self.store.scalar("SELECT file_bytes FROM diff WHERE id = ?", (li.diff_rowid,))
                out.append({"id": digest, "repo_tags": refs.image_tags(self.store, rowid), "layers": len(chain),
                            "size": size, "created": created})
        return out

    def history(self, ref: str) -> list[dict]:
        """The image's history, newest first, like `docker history`."""
        with self.store.read():
            r = refs.resolve(self.store, ref)
            if r.image_rowid is None:
                raise NotFound(f"{ref}: no image holds this layer, so it has no history")
            by_pos = {li.position: li for li in r.layers}
            rows = self.store.execute(
                "SELECT idx, position, created, created_by, comment, empty_layer FROM history"
                " WHERE image_id = ? ORDER BY idx", (r.image_rowid,)
            ).fetchall()
            sizes = {li.position: self.store.scalar("SELECT file_bytes FROM diff WHERE id = ?", (li.diff_rowid,))
                     for li in r.layers}
            out = []
            for idx, pos, created, created_by, comment, empty in rows:
                li = by_pos.get(pos) if pos is not None else None
                if pos is not None and li is None:
                    continue  # above the REF's position (REF~N)
                out.append({
                    "position": pos,
                    "layer_id": li.chain_id if li else None,
                    "diff_id": li.diff_id if li else None,
                    "created": created,
                    "created_by": created_by,
                    "comment": comment,
                    "size": sizes.get(pos, 0) if pos is not None else 0,
                    "empty_layer": bool(empty),
                })
        out.reverse()
        return out

    # Views ------------------------------------------------------------------

    def cat(self, ref: str, path: str | bytes) -> Iterator[bytes]:
        """The bytes of a regular file at REF, chunk by chunk."""
        p = parse_path(path)
        with self.store.read():
            r = refs.resolve(self.store, ref)
            node = View().replay(self.closure_events(r, p)).get(p)
            if node is None:
                raise NotFound(f"{show_path(p)}: no such file at {ref}")
            if node.type == "d":
                raise UsageError(f"{show_path(p)}: is a directory at {ref}")
            if node.type != "f":
                raise UsageError(f"{show_path(p)}: is a {TYPE_NAMES.get(node.type, node.type)}, not a regular file, at {ref}")
            if node.size:
                yield from self.content.iter_blob(node.blob_id)

    def listing(self, ref: str, path: str | bytes = b"", recursive: bool = False) -> list[dict]:
        """Entries of a directory at REF (or the one entry, for a non-directory), as dicts.

        A directory's own entries come sorted by raw bytes; recursive=True lists
        everything below it in tree order (replay.tree_key, as export writes
        it).  iter_listing() gives the same rows as a stream."""
        return list(self.iter_listing(ref, path, recursive))

    def iter_listing(self, ref: str, path: str | bytes = b"", recursive: bool = False) -> Iterator[dict]:
        """listing() as an iterator.  Errors (no such path) are raised here, before
        the first row.  recursive=True streams the subtree in tree order from
        export.TreeEntries (a large image replays partition by partition), so
        memory stays flat however many files the image holds."""
        p = parse_path(path)
        if not recursive:
            with self.store.read():
                r = refs.resolve(self.store, ref)
                # The directory and its children only: the rest of the image is not replayed.
                kids = below(self.store, r.chain, p, children=True)
                view = View().replay(decided_events(self.store, [r.chain], [p], known=kids)[0])
            chain_ids = {li.position: li.chain_id for li in r.layers}
            node = view.get(p)
            if node is None:
                raise NotFound(f"{show_path(p)}: no such file or directory at {ref}")
            entries = [(p, node)] if node.type != "d" else view.list_dir(p)
            return iter([node_dict(q, n, chain_ids) for q, n in entries])
        return self.stream(self._tree_rows(ref, p))

    def _tree_rows(self, ref: str, top: bytes) -> Iterator[dict | None]:
        """None once REF and top are checked, then every entry below top (not top
        itself; a non-directory: that entry), in tree order, streamed.  One read
        transaction from the resolution to the last row."""
        from .tree import TreeEntries, within

        with self.store.read():
            r = refs.resolve(self.store, ref)
            chain_ids = {li.position: li.chain_id for li in r.layers}
            if top:
                node = View().replay(self.closure_events(r, top)).get(top)
                if node is None:
                    raise NotFound(f"{show_path(top)}: no such file or directory at {ref}")
                if node.type != "d":
                    yield None
                    yield node_dict(top, node, chain_ids)
                    return
            yield None
            with TreeEntries(self.store, r.chain) as source:
                for q, n, _ in within(source.batches(), top):
                    yield node_dict(q, n, chain_ids)


    # Export -----------------------------------------------------------------

    # One read transaction around the replay and the reading of contents: a gc
    # committing in between must not take contents the view still names.

    def export_tar(self, ref: str, out: BinaryIO, progress: Callable[[int, int], None] | None = None) -> int:
        """The view at REF as a tar, in tree order (engine/export.py).  An image's
        view replays partition by partition when large: memory stays flat."""
        from .tree import TreeEntries
        from .output.export import write_tar

        with self.store.read():
            r = refs.resolve(self.store, ref)
            with TreeEntries(self.store, r.chain) as source:
                return write_tar(source.batches(), self.content, out, progress, source.total,
                                 source.partitioned)

    def export_dir(self, ref: str, target: str, allow_devices: bool = False) -> int:
        """The view at REF into a new directory DIR, in tree order, replayed in
        partitions when large (as export_tar)."""
        from .tree import TreeEntries
        from .output.export import refuse_specials, write_dir_entries

        with self.store.read():
            r = refs.resolve(self.store, ref)
            if not allow_devices:
                refuse_specials(self.store, r.chain)
            with TreeEntries(self.store, r.chain) as source:
                return write_dir_entries(source.batches(), self.content, target)

    def layer_tar(self, diff_id: str) -> Iterator[bytes]:
        """The original tar of a stored diff, byte for byte, as a stream."""
        from .output.lossless import iter_layer_tar

        with self.store.read():
            rowid = self.store.scalar("SELECT id FROM diff WHERE diff_id = ?", (diff_id,))
            if rowid is None:
                raise NotFound(f"no stored diff {diff_id}")
            yield from iter_layer_tar(self.store.conn, self.content, rowid)

    # Audit ------------------------------------------------------------------

    def log(self, path: str | bytes, image: str | None = None, all_images: bool = False,
            patch: bool = False) -> list[dict]:
        """Every change to `path` along the image's chain, oldest first (audit/timeline.py)."""
        from .audit import timeline

        return timeline.log(self, path, image, all_images, patch)

    def diff(self, ref1: str, ref2: str) -> Iterator[dict]:
        """A/C/D rows from the view at ref1 to the view at ref2, streamed in tree order."""
        from .audit.diffs import iter_diff

        return iter_diff(self, ref1, ref2)

    def diff_stat(self, rows) -> dict:
        from .audit.diffs import diff_stat

        return diff_stat(rows)

    def changes(self, ref: str) -> Iterator[dict]:
        """Each layer's change set (history --changes), newest layer first, streamed."""
        from .audit.diffs import iter_changes

        return iter_changes(self, ref)

    def find(self, name=None, path=None, sha256=None, visible_only: bool = False) -> list[dict]:
        from .audit.search import find

        return find(self, name=name, path=path, sha256=sha256, visible_only=visible_only)

    def waste(self, ref: str) -> dict:
        from .audit.wasted import waste

        return waste(self, ref)

    def waste_failures(self, report: dict, lowest_efficiency, highest_wasted_bytes, highest_user_wasted_percent):
        from .audit.wasted import waste_failures

        return waste_failures(report, lowest_efficiency, highest_wasted_bytes, highest_user_wasted_percent)

    def version_contents(self, path: str | bytes, version: int, image: str | None = None) -> Iterator[bytes]:
        """The bytes of version N of a path (as `log` numbers them)."""
        from .audit.timeline import version_contents

        return version_contents(self, path, version, image)

    # Save, verify, measure ------------------------------------------------------

    def save(self, images: list[str], out: BinaryIO, fmt: str = "docker") -> list[dict]:
        """Write images as one docker-save ("docker") or OCI layout ("oci") tar to out."""
        from .output.save import save

        with self.store.read():
            return save(self.store, self.content, images, out, fmt)

    def fsck(self, deep: bool = False):
        """A checker: iterate its findings(); its counts say what was checked."""
        from .upkeep.fsck import Fsck

        return Fsck(self.store, self.content, deep)

    def stats(self) -> dict:
        from .upkeep.stats import stats

        return stats(self.store, self.content)

    # Remove, reclaim ----------------------------------------------------------------

    def remove(self, names: list[str]):
        """Remove images (or single tags of images with several), all or none."""
        from .upkeep.maint import remove

        return remove(self.store, names)

    def gc(self):
        """Delete what no image references, then shrink the file."""
        from .upkeep.maint import collect

        return collect(self.store, self.chunks)

    # explore (engine/explore): the model behind `layerdb explore` ---------------------------

    def explorer(self, ref: str):
        """The explorer's model on REF: layers, details, the lazily listed tree,
        history, diffs, file views, extraction, search and shared layers."""
        from .explore import Explorer

        return Explorer(self, ref)

    def explorer_tree(self, explorer, t: int | None = None, aggregated: bool = False):
        """The tree pane's state (engine/explore TreeState) on an explorer, at layer t (default: the top)."""
        from .explore import TreeState

        return TreeState(explorer, t or explorer.top, aggregated)

    # explore: end -----------------------------------------------------------------------------

    # Containers (engine/container.py): every write is an event of the container's log ------

    def container(self, name: str, whole: bool | None = None):
        """A handle on a container (cached: its view is kept and caught up, not
        replayed per call).  whole=True keeps the whole view even for a large
        image (container.WHOLE_EVENTS), as a FUSE mount needs."""
        from .containers.container import Container

        handles = self.__dict__.setdefault("_containers", {})
        h = Container(self.store, self.content, name, whole)
        return handles.setdefault((h.diff_rowid, h.whole), h)

    def container_create(self, image: str, name: str | None = None) -> dict:
        from .containers import container

        return container.create(self.store, image, name)

    def containers(self) -> list[dict]:
        from .containers import container

        return container.listing(self.store)

    def container_rm(self, name: str) -> dict:
        from .containers import container

        return container.remove(self.store, name)

    def container_diff(self, name: str) -> list[dict]:
        """`docker diff`: A/C/D from the container's image to the container."""
        from .audit.diffs import diff
        from .containers import container

        c = self.container(name)
        return container.docker_changes(diff(self, c.image_digest, c.diff_id))

    def container_apply(self, name: str, directory: str) -> int:
        return self.container(name).apply_dir(directory)

    # The writes below are engine/container.Container's; see there for each one's keywords.

    def write_file(self, container: str, path, data, mode=None, uid=None, gid=None, **kw) -> bytes:
        """Create or replace a regular file from bytes, a file object or an iterable of bytes."""
        return self.container(container).write_file(path, data, mode, uid, gid, **kw)

    def append_file(self, container: str, path, data, **kw) -> bytes:
        return self.container(container).append_file(path, data, **kw)

    def mkdir(self, container: str, path, mode=0o755, uid=0, gid=0, **kw) -> bytes:
        return self.container(container).mkdir(path, mode, uid, gid, **kw)

    def symlink(self, container: str, path, target, **kw) -> bytes:
        return self.container(container).symlink(path, target, **kw)

    def link(self, container: str, path, target, **kw) -> bytes:
        return self.container(container).link(path, target, **kw)

    def remove_path(self, container: str, path, recursive=False, **kw) -> bytes:
        """rm (-r): a whiteout.  (`remove` is taken: it removes images.)"""
        return self.container(container).remove(path, recursive, **kw)

    def rename(self, container: str, src, dst, **kw) -> bytes:
        return self.container(container).rename(src, dst, **kw)

    def chmod(self, container: str, path, mode, **kw) -> bytes:
        return self.container(container).chmod(path, mode, **kw)

    def chown(self, container: str, path, uid=None, gid=None, **kw) -> bytes:
        return self.container(container).chown(path, uid, gid, **kw)

    def utime(self, container: str, path, mtime, **kw) -> bytes:
        return self.container(container).utime(path, mtime, **kw)

    def copy_in(self, source: str, container: str, dest, archive=False) -> bytes:
        return self.container(container).copy_in(source, dest, archive)

    def copy_out(self, container: str, path, target: str, allow_devices=False) -> str:
        return self.container(container).copy_out(path, target, allow_devices)

    def commit(self, container: str, tag: str | None, message: str | None = None, changes=()) -> dict:
        return self.container(container).commit(tag, message, changes)

    def mount(self, target: str, mountpoint: str, writable: bool) -> None:
        """Serve REF (read-only) or a container (writable) over FUSE until unmounted."""
        from .containers import fusefs

        fusefs.mount(self, target, mountpoint, writable)

    @staticmethod
    def unmount(mountpoint: str) -> None:
        from .containers import fusefs

        fusefs.unmount(mountpoint)

    # registries -------------------------------------------------------------

    def pull(self, source: str, *, creds: str | None = None, authfile: str | None = None,
             tls_verify: bool | None = None, cert_dir: str | None = None, platform: str | None = None,
             all_platforms: bool = False, tags: list[str] | None = None, progress: Callable[[str, dict], None] | None = None):
        """Fetch an image over the distribution API into the store (a transaction a layer,
        then one for the images: see registry/pull.py); layers whose diff_id is stored are
        not downloaded.  tls_verify: None follows registries.conf's `insecure`, True or
        False overrides it (registry.auth.RegistryOptions).  Returns a registry.pull.PullResult."""
        from .registry import auth as _auth, pull as _pull

        opts = _auth.options(creds, authfile, tls_verify, cert_dir)
        return _pull.pull(self.store, self.content, source, opts, platform=platform, all_platforms=all_platforms,
                          tags=tags, progress=progress)

    def push(self, image: str, dest: str | None = None, *, creds: str | None = None, authfile: str | None = None,
             tls_verify: bool | None = None, cert_dir: str | None = None, fmt: str | None = None,
             preserve_digests: bool = False, progress: Callable[[str, dict], None] | None = None):
        """Upload an image; the original manifest when its blobs are there or mountable.
        Returns a registry.push.PushResult."""
        from .registry import auth as _auth, push as _push

        opts = _auth.options(creds, authfile, tls_verify, cert_dir)
        return _push.push(self.store, self.content, image, dest, opts, fmt=fmt, preserve_digests=preserve_digests,
                          progress=progress)

    @staticmethod
    def login(registry: str | None, username: str, password: str, *, authfile: str | None = None,
              tls_verify: bool | None = None, cert_dir: str | None = None) -> str:
        """Check the credentials against the registry, then store them; returns where."""
        from .registry import auth

        return auth.login(registry, username, password, authfile=authfile, tls_verify=tls_verify, cert_dir=cert_dir)

    @staticmethod
    def logout(registry: str | None, *, authfile: str | None = None) -> list[str]:
        """Remove the registry's credentials; returns the files changed."""
        from .registry import auth

        return auth.logout(registry, authfile=authfile)

    # builds ------------------------------------------------------------------
    # `layerdb build` (engine/build/): a Dockerfile to an image; RUN on kernel overlayfs, else
    # fuse-overlayfs, else export, run and apply (engine/build/builder.py says why in that order).

    def build(self, context: str, dockerfile: str | None = None, tags: list[str] | None = None,
              build_args: dict[str, str] | None = None, target: str | None = None, no_cache: bool = False,
              timestamp: int | None = None, network: str = "host", cache_dir: str | None = None,
              progress: Callable[[str, str], None] | None = None, pull: bool = False, creds: str | None = None,
              authfile: str | None = None, tls_verify: bool | None = None, cert_dir: str | None = None,
              secrets: dict[str, str] | None = None, platform: str | None = None):
        """Build an image from a Dockerfile; returns a build.builder.BuildResult.
        progress(kind, text) gets the step lines, cache decisions and RUN output.
        pull=True: a FROM image that is not stored is pulled, with the registry
        options of `pull` (the CLI's default, as buildah's); else it is refused.
        secrets: id -> host file, for RUN --mount=type=secret; platform: OS/ARCH[/VARIANT]
        of the image (default this machine's), as a FROM --platform picks one."""
        from .build.builder import BuildOptions, Builder
        from .registry import auth

        opts = BuildOptions(context, dockerfile, list(tags or []), dict(build_args or {}), target, no_cache,
                            timestamp, network, cache_dir,
                            auth.options(creds, authfile, tls_verify, cert_dir) if pull else None,
                            dict(secrets or {}), platform)
        return Builder(self.store, self.content, opts, progress).build()
