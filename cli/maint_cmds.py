"""Commands that remove: rm and gc."""

from __future__ import annotations

import click

from . import render
from .base import cli, json_option, open_db


@cli.command()
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
@json_option
@click.pass_context
def rm(ctx, images, as_json):
    """Remove images: NAME:TAG of an image with several tags removes just that tag (like
    `docker rmi`); its last tag or its id removes the image.  All or nothing; `gc` reclaims
    the space."""
    db = open_db(ctx)
    for r in db.remove(list(images)):
        if as_json:
            render.json_line(r.as_dict())
            continue
        for t in r.untagged:
            click.echo(f"Untagged: {t}")
        if r.deleted:
            click.echo(f"Deleted: {r.image}")


@cli.command()
@json_option
@click.pass_context
def gc(ctx, as_json):
    """Delete layers, contents and paths that no image references, then shrink the store file."""
    db = open_db(ctx)
    r = db.gc()
    if as_json:
        render.json_line(r.as_dict())
        return
    wal = "" if r.checkpointed else " (a reader holds part of the WAL: the file shrinks at a later checkpoint)"
    click.echo(f"removed {r.layers} layers, {r.diffs} diffs, {r.events} events, {r.blobs} contents,"
               f" {r.chunks} chunks, {r.paths} paths; store {render.size(r.bytes_before)} -> {render.size(r.bytes_after)}"
               + wal)
