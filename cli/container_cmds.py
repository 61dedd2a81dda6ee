"""Container commands: container create/ls/rm/diff/apply, cp, commit, mount, umount."""

from __future__ import annotations

import click

from . import render
from .audit_cmds import json_rows, write_text
from .base import cli, json_option, open_db


@cli.group()
def container():
    """Writable layers on images: every write is an event of the container's log."""


@container.command("create")
@click.argument("image")
@click.option("--name", metavar="NAME", help="The container's name (default: the image's name and a short id).")
@json_option
@click.pass_context
def create_cmd(ctx, image, name, as_json):
    """Create an empty container on top of IMAGE."""
    c = open_db(ctx).container_create(image, name)
    if as_json:
        render.json_line(c)
    else:
        click.echo(c["name"])


@container.command("ls")
@json_option
@click.option("--no-trunc", is_flag=True, help="Show full container and image ids.")
@click.pass_context
def ls_cmd(ctx, as_json, no_trunc):
    """List containers: id, image, created, events written, name."""
    rows = open_db(ctx).containers()
    if as_json:
        return json_rows(rows)
    table = []
    for r in rows:
        image = r["image"] if not r["image"].startswith("sha256:") or no_trunc else render.short(r["image"])
        table.append([r["id"] if no_trunc else r["id"][:12], image, render.ago(r["created"]), str(r["events"]),
                      r["name"]])
    render.table(["CONTAINER ID", "IMAGE", "CREATED", "EVENTS", "NAME"], table)


@container.command("rm")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@json_option
@click.pass_context
def rm_cmd(ctx, names, as_json):
    """Remove containers and their logs (the contents they wrote go at the next `gc`)."""
    db = open_db(ctx)
    for n in names:
        r = db.container_rm(n)
        if as_json:
            render.json_line(r)
        else:
            click.echo(r["name"])


@container.command("diff")
@click.argument("name")
@json_option
@click.pass_context
def diff_cmd(ctx, name, as_json):
    """What the container changed in its image, as `docker diff` prints it (A/C/D)."""
    rows = open_db(ctx).container_diff(name)
    if as_json:
        return json_rows(rows)
    for r in rows:
        write_text(f"{r['change']} {r['path']}\n")


@container.command("apply")
@click.argument("name")
@click.option("--from-dir", "directory", required=True, type=click.Path(exists=True, file_okay=False),
              help="A directory holding the whole tree the container should show.")
@json_option
@click.pass_context
def apply_cmd(ctx, name, directory, as_json):
    """Record the difference between the container's view and DIR as events."""
    n = open_db(ctx).container_apply(name, directory)
    if as_json:
        render.json_line({"container": name, "events": n})
    else:
        click.echo(f"{n} events")


def _container_side(arg: str) -> tuple[str, str] | None:
    """NAME:/path -> (NAME, /path); a host path (./a:b, /x, relative without ':') -> None."""
    if arg.startswith(("/", ".")) or ":" not in arg:
        return None
    name, _, path = arg.partition(":")
    return name, path or "/"


@cli.command()
@click.argument("src")
@click.argument("dst")
@click.option("-a", "--archive", is_flag=True, help="Copying in: keep the host files' owners (default: root).")
@click.option("--allow-devices", is_flag=True, help="Copying a tree out: create the fifos and device files it holds.")
@click.pass_context
def cp(ctx, src, dst, archive, allow_devices):
    """Copy between the host and a container: `cp HOSTPATH NAME:/path` or `cp NAME:/path HOSTPATH`.

    Files and directory trees; an existing directory receives the source by name.
    A host path holding ':' is written ./like:this.
    """
    from layerdb.engine.errors import UsageError

    a, b = _container_side(src), _container_side(dst)
    if (a is None) == (b is None):
        raise UsageError("cp copies between the host and a container: one side must be NAME:/path")
    db = open_db(ctx)
    if b is not None:
        db.copy_in(src, b[0], b[1], archive=archive)
    else:
        db.copy_out(a[0], a[1], dst, allow_devices)


@cli.command()
@click.argument("name")
@click.argument("tag", metavar="NAME:TAG", required=False)
@click.option("-m", "--message", metavar="MSG", help="The history entry's comment.")
@click.option("-c", "--change", "changes", multiple=True, metavar="INSTR",
              help="Dockerfile instruction for the config: CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, USER, VOLUME, WORKDIR.")
@json_option
@click.pass_context
def commit(ctx, name, tag, message, changes, as_json):
    """Seal container NAME's changes into a new layer and image, tagged NAME:TAG."""
    r = open_db(ctx).commit(name, tag, message, changes)
    if as_json:
        render.json_line(r)
    else:
        click.echo(r["id"])


@cli.command()
@click.option("--at", "ref", metavar="REF", help="Mount this view read-only (any REF, containers too).")
@click.argument("args", nargs=-1, required=True, metavar="[NAME] MOUNTPOINT")
@click.pass_context
def mount(ctx, ref, args):
    """Serve a view over FUSE until unmounted (`layerdb umount`, fusermount3 -u, or Ctrl-C).

    `mount --at REF MOUNTPOINT` is read-only; `mount NAME MOUNTPOINT` mounts
    container NAME read-write: every write becomes an event of its log (a file
    written through the mount is one event when it is closed).
    """
    from layerdb.engine.errors import UsageError

    if ref is not None:
        if len(args) != 1:
            raise UsageError("mount --at REF takes one MOUNTPOINT")
        open_db(ctx).mount(ref, args[0], writable=False)
    else:
        if len(args) != 2:
            raise UsageError("give `mount NAME MOUNTPOINT` (a container, read-write) or `mount --at REF MOUNTPOINT`")
        open_db(ctx).mount(args[0], args[1], writable=True)


@cli.command()
@click.argument("mountpoint")
def umount(mountpoint):
    """Unmount a `layerdb mount` (its process then exits)."""
    from layerdb.engine.api import LayerDB

    LayerDB.unmount(mountpoint)
