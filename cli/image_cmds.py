"""Commands on images as wholes: import, images, history."""

from __future__ import annotations


import click

from . import render
from .base import cli, json_option, open_db, progress


@cli.command("import")
@click.argument("archive", type=click.Path(dir_okay=False))
@click.option("--tag", metavar="NAME:TAG", help="Tag the imported image (archives with one image).")
@click.option("--platform", metavar="OS/ARCH[/VARIANT]",
              help="Which image of a multi-platform index to import (default: this machine's).")
@json_option
@click.pass_context
def import_cmd(ctx, archive, tag, platform, as_json):
    """Import every image in a docker-save or OCI archive."""
    db = open_db(ctx)
    update, stop = progress("import")
    try:
        res = db.import_archive(archive, tag=tag, platform=platform, progress=update)
    finally:
        stop()
    for img in res.images:
        if as_json:
            render.json_line({"id": img["id"], "repo_tags": img["repo_tags"], "layers": img["layers"],
                              "new": img["new"]})
        elif img["repo_tags"]:
            for t in img["repo_tags"]:
                click.echo(f"Loaded image: {t}")
        else:
            click.echo(f"Loaded image ID: {img['id']}")


@cli.command()
@json_option
@click.option("--no-trunc", is_flag=True, help="Show full image ids.")
@click.pass_context
def images(ctx, as_json, no_trunc):
    """List images: name:tag, id, layers, size, created."""
    db = open_db(ctx)
    rows = db.images()
    if as_json:
        for r in rows:
            render.json_line(r)
        return
    table = []
    for r in rows:
        iid = r["id"] if no_trunc else render.short(r["id"])
        for t in r["repo_tags"] or ["<none>:<none>"]:
            repo, _, tg = t.rpartition(":")
            table.append([repo, tg, iid, str(r["layers"]), render.ago(r["created"]), render.size(r["size"])])
    render.table(["REPOSITORY", "TAG", "IMAGE ID", "LAYERS", "CREATED", "SIZE"], table)


@cli.command()
@click.argument("image")
@json_option
@click.option("--no-trunc", is_flag=True, help="Do not truncate created_by.")
@click.option("--changes", is_flag=True, help="Each layer's change set instead: A/C/D per path against the layer below.")
@click.pass_context
def history(ctx, image, as_json, no_trunc, changes):
    """One row per history entry, newest first (like `docker history`)."""
    db = open_db(ctx)
    if changes:
        from . import audit_cmds

        audit_cmds.render_changes(db.changes(image), as_json, no_trunc)
        return
    rows = db.history(image)
    if as_json:
        for r in rows:
            render.json_line(r)
        return
    table = []
    for r in rows:
        lid = render.short(r["layer_id"]) if r["layer_id"] else "<missing>"
        cb = r["created_by"] or ""
        if not no_trunc:
            cb = render.trunc(cb, 60)
        table.append([lid, render.ago(r["created"]), cb, render.size(r["size"]), r["comment"] or ""])
    render.table(["LAYER", "CREATED", "CREATED BY", "SIZE", "COMMENT"], table)
