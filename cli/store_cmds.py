"""Commands on the store as a whole: save, fsck, stats."""

from __future__ import annotations

import sys

import click

from . import render
from .base import cli, json_option, open_db


@cli.command()
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
@click.option("-o", "--output", metavar="FILE", help="Write the archive here ('-' for stdout).")
@click.option("--format", "fmt", type=click.Choice(["docker", "oci"]), default="docker", show_default=True,
              help="docker: a `docker save` archive (plain layer tars); oci: an OCI image layout (gzip layers).")
@click.pass_context
def save(ctx, images, output, fmt):
    """Write images as one archive whose layer tars are byte-identical to the imported ones."""
    from layerdb.engine.errors import UsageError

    if not output:
        if sys.stdout.isatty():
            raise UsageError("refusing to write a tar to a terminal: use -o FILE or -o -")
        output = "-"
    db = open_db(ctx)
    if output == "-":
        db.save(list(images), sys.stdout.buffer, fmt)
        sys.stdout.buffer.flush()
    else:
        render.atomic_write(output, lambda f: db.save(list(images), f, fmt))


def _where(f: dict) -> str:
    parts = []
    if f["path"]:
        parts.append(f["path"])
    if f["layers"]:
        parts.append("layer " + ", ".join(f"{li['position']} ({render.short(li['layer_id'])})" for li in f["layers"]))
    elif f["diff_id"]:
        parts.append(f"diff {render.short(f['diff_id'])} (in no layer)")
    if f["images"]:
        parts.append("of " + ", ".join(", ".join(i["repo_tags"]) or render.short(i["id"]) for i in f["images"]))
    return " ".join(parts)


@cli.command()
@click.option("--deep", is_flag=True,
              help="Also rebuild every layer tar, hash it, and compare each of its headers with its stored event;"
                   " check containers' logs.")
@json_option
@click.pass_context
def fsck(ctx, deep, as_json):
    """Verify every hash, reference and layer chain; name the layers and images a problem breaks.

    \b
    fsck: layer chains and chain ids, image configs against their digests and
      diff_ids, tags, each diff's entry count and file bytes, every event's
      diff, path, hard-link target and content row, and every content: each
      chunk is decompressed and hashed, each file's bytes hashed where they
      lie.  One read of the store: about 1 s of CPU for the bench's
      Debian+python3 image (4 layers, 245 MiB, 10,000 entries), 1.3 s for one
      of 200,000 small files.
    fsck --deep: also rebuilds every layer tar from the store and hashes it
      against its diff_id, and reads it as import does: each entry must be
      its stored event, field by field (path, type, mode with the setuid,
      setgid and sticky bits, uid, gid, mtime, size, symlink and hard-link
      targets, device numbers, xattrs; whiteouts, opaque markers and implied
      parents too), each file's content the one it held at import (8 bytes
      of its sha256 are kept per tar entry), and no event may be one the tar
      does not hold.  (A layer imported before schema version 4 has no such
      tags: a file given another content of its size is then named by its
      layer only.)  Containers have no tar:
      their writes must be well formed and, replayed over their image, find
      directories as parents and files as hard-link targets.  A second pass
      that decompresses and parses everything: about 2 s of CPU in all for
      Debian+python3, 7 s for 200,000 small files.

    Exit code 6 when anything is wrong, each problem one line (or one JSON
    object with --json) naming its diff, path, layers and images.
    """
    from layerdb.engine.errors import CorruptStore

    db = open_db(ctx)
    check = db.fsck(deep=deep)
    n = 0
    layers: set[str] = set()
    images: set[str] = set()
    for finding in check.findings():
        f = finding.as_dict()
        n += 1
        layers.update(li["layer_id"] for li in f["layers"])
        images.update(i["id"] for i in f["images"])
        if as_json:
            render.json_line(f)
        else:
            where = _where(f)
            click.echo(f"{f['check']} {f['object']}: {f['problem']}" + (f"\n    {where}" if where else ""))
    c = check.counts
    checked = (f"{c['images']} images, {c['layers']} layers, {c['diffs']} diffs, {c['events']} events,"
               f" {c['blobs']} contents, {c['chunks']} chunks, {c['manifests']} registry manifests")
    if deep:
        checked += (f", {c['layer_tars']} layer tars rebuilt with {c['tar_entries']} tar entries compared to their"
                    f" events, {c['container_logs']} container logs ({c['container_events']} events)")
    aufs = f"; {c['ignored']} AUFS bookkeeping entries kept, not applied" if c["ignored"] else ""
    if n:
        sys.stdout.flush()
        raise CorruptStore(f"fsck: {n} problem{'s' if n != 1 else ''} breaking {len(layers)} layer(s) of"
                           f" {len(images)} image(s) (checked {checked}){aufs}")
    click.echo(f"fsck: ok: {checked}{aufs}", err=True)


STATS_ROWS = [
    ("images", "images", None), ("tags", "tags", None), ("layers", "layers", None), ("diffs", "diffs", None),
    ("tar entries", "entries", None), ("events", "events", None), ("paths", "paths", None),
    ("unique contents", "contents", None), ("chunks", "chunks", None), ("AUFS entries", "aufs_entries", None),
    ("registry manifests", "manifests", None), ("registry indexes", "indexes", None),
    ("layer descriptors kept", "layer_descriptors", None), ("digests seen at registries", "seen", None),
    ("logical bytes", "logical_bytes", "size"), ("logical file bytes", "logical_file_bytes", "size"),
    ("stored diffs' tar bytes", "tar_bytes", "size"), ("unique content bytes", "content_raw_bytes", "size"),
    ("stored bytes (all chunks)", "stored_bytes", "size"), ("stored content bytes", "content_stored_bytes", "size"),
    ("framing bytes", "framing_bytes", "size"), ("content tag bytes", "tag_bytes", "size"),
    ("stored framing bytes", "framing_stored_bytes", "size"),
    ("database file", "db_bytes", "size"), ("dedup ratio", "dedup_ratio", "x"),
    ("compression ratio", "compression_ratio", "x"), ("logical / stored", "overall_ratio", "x"),
    ("framing share", "framing_share", "%"), ("framing bytes per entry", "framing_bytes_per_entry", None),
]


@cli.command()
@json_option
@click.pass_context
def stats(ctx, as_json):
    """Counts, sizes, dedup and compression figures, and the cost of the lossless tar framing."""
    s = open_db(ctx).stats()
    if as_json:
        render.json_line(s)
        return
    rows = []
    for label, key, kind in STATS_ROWS:
        v = s[key]
        if v is None:
            text = "-"
        elif kind == "size":
            text = f"{render.size(v)} ({v})"
        elif kind == "x":
            text = f"{v:.2f}x"
        elif kind == "%":
            text = f"{100 * v:.2f}%"
        else:
            text = str(v)
        rows.append([label, text])
    render.table(["WHAT", "VALUE"], rows)
