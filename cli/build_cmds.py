"""`layerdb build`: a Dockerfile to an image (engine/build/)."""

from __future__ import annotations

import sys

import click

from . import render
from .base import cli, json_option, open_db
from .registry_cmds import TLS_VERIFY_HELP, tls_verify_option


def _build_arg(ctx, param, values):
    out = {}
    for v in values:
        k, eq, val = v.partition("=")
        if not k:
            raise click.BadParameter(f"{v!r}: expected NAME=VALUE", ctx, param)
        if not eq:
            import os

            if k not in os.environ:
                continue  # `--build-arg NAME` takes NAME from the environment, when set (as docker)
            val = os.environ[k]
        out[k] = val
    return out


def _secret(ctx, param, values):
    out = {}
    for v in values:
        fields = dict(f.partition("=")[::2] for f in v.split(","))
        src = fields.get("src") or fields.get("source")
        if not fields.get("id") or not src or set(fields) - {"id", "src", "source", "type"} \
                or fields.get("type", "file") != "file":
            raise click.BadParameter(f"{v!r}: expected id=ID,src=FILE", ctx, param)
        out[fields["id"]] = src
    return out


@cli.command()
@click.argument("context", type=click.Path(exists=True, file_okay=False))
@click.option("-f", "--file", "dockerfile", type=click.Path(dir_okay=False),
              help="The Dockerfile (default: CONTEXT/Dockerfile, else CONTEXT/Containerfile).")
@click.option("-t", "--tag", "tags", multiple=True, metavar="NAME:TAG", help="Tag the image (repeatable).")
@click.option("--build-arg", "build_args", multiple=True, metavar="NAME=VALUE", callback=_build_arg,
              help="Set a build argument (repeatable).")
@click.option("--target", metavar="STAGE", help="Build this stage (name or index) and what it needs.")
@click.option("--no-cache", is_flag=True, help="Build every step again.")
@click.option("--iidfile", type=click.Path(dir_okay=False), help="Write the image id (sha256:...) here.")
@click.option("--timestamp", type=int, metavar="SECONDS",
              help="Created times and file times of new layers (reproducible builds; default $SOURCE_DATE_EPOCH).")
@click.option("--network", type=click.Choice(["host", "none"]), default="host", show_default=True,
              help="The network of RUN steps.")
@click.option("--secret", "secrets", multiple=True, metavar="id=ID,src=FILE", callback=_secret,
              help="A file RUN --mount=type=secret,id=ID can read; never stored (repeatable).")
@click.option("--platform", metavar="OS/ARCH[/VARIANT]",
              help="The image's platform (default: this machine's); FROM picks that image of an index.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the image id.")
@click.option("--pull/--no-pull", "pull", default=True, show_default=True,
              help="Pull a FROM image that is not in the store (buildah's pull policy 'missing').")
@click.option("--creds", metavar="USER[:PASSWORD]", help="Credentials for pulling FROM images.")
@click.option("--authfile", type=click.Path(dir_okay=False), metavar="FILE",
              help="Credentials file (auth.json / config.json), as for pull.")
@click.option("--cert-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="*.crt files are trusted CAs; *.cert + *.key a client certificate.")
@tls_verify_option("For pulling FROM images, as for pull: " + TLS_VERIFY_HELP)
@json_option
@click.pass_context
def build(ctx, context, dockerfile, tags, build_args, target, no_cache, iidfile, timestamp, network, secrets,
          platform, quiet, pull, creds, authfile, cert_dir, tls_verify, as_json):
    """Build an image from a Dockerfile, RUN steps included.

    \b
    A RUN step's root is kernel overlayfs; where it cannot be mounted,
    fuse-overlayfs; where neither can, the step's parent view is exported, the
    step runs in it and the difference is applied (slower; the output says so).
    $LAYERDB_BUILD_ROOT=kernel|fuse|export forces one."""
    db = open_db(ctx)
    verbose = ctx.find_root().params.get("verbose") or 0

    def progress(kind: str, text: str) -> None:
        if quiet or as_json:
            return
        if kind == "output":
            sys.stderr.write(text)
            sys.stderr.flush()
        elif kind != "cache" or verbose or text.startswith("--> Using cache") or "miss" in text:
            click.echo(text, err=True)

    res = db.build(context, dockerfile, list(tags), build_args, target, no_cache, timestamp, network,
                   progress=progress, pull=pull, creds=creds, authfile=authfile, cert_dir=cert_dir,
                   tls_verify=tls_verify, secrets=secrets, platform=platform)
    if iidfile:
        with open(iidfile, "w") as f:
            f.write(res.id)
    if as_json:
        render.json_line({"id": res.id, "repo_tags": res.tags, "layers": res.layers, "steps": res.steps,
                          "cached": res.cached, "new": res.new_image, "misses": res.misses})
        return
    if not quiet:
        for t in res.tags:
            click.echo(f"Successfully tagged {t}", err=True)
    click.echo(res.id)
