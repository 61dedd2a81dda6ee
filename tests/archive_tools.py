"""Derive damaged image archives from good ones, for tests.

An ArchiveEditor loads an outer archive (docker save or OCI layout tar) member
by member, lets a test replace, rename, add or delete members, and writes a new
tar in which every member the test did not touch is copied byte for byte (its
raw headers, data and padding, in the original order), followed by the
original end-of-archive bytes.  Only touched members get a new header.  The image-aware helpers know where layers,
configs and manifests live, and can rewrite a config *and* every digest that
names it, so that only a later check can catch a planted fault.
"""

from __future__ import annotations

import copy
import hashlib
import json
import posixpath
import tarfile
from pathlib import Path


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def flip_byte(data: bytes, offset: int) -> bytes:
    """data with every bit of the byte at offset inverted."""
    if offset < 0:
        offset += len(data)
    assert 0 <= offset < len(data), (offset, len(data))
    b = bytearray(data)
    b[offset] ^= 0xFF
    return bytes(b)


class ArchiveEditor:
    def __init__(self, src: str | Path):
        self.src = Path(src)
        raw = self.src.read_bytes()
        # [TarInfo, data (regular files) or None, raw bytes or None once touched]
        self.entries: list[list] = []
        with tarfile.open(self.src, "r:") as tf:
            self.format = tf.format
            members = tf.getmembers()
            for m in members:
                data = tf.extractfile(m).read() if m.isfile() else None
                self.entries.append([copy.copy(m), data, None])
        ends = [m.offset for m in members[1:]]
        if members:
            last = members[-1]
            size = last.size if last.isfile() else 0
            ends.append(last.offset_data + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)
        for e, m, end in zip(self.entries, members, ends):
            e[2] = raw[m.offset : end]
        self.trailer = raw[ends[-1] :] if members else raw
        self.kind = "docker" if self.has("manifest.json") else "oci"

    # Members ------------------------------------------------------------------

    def _find(self, name: str) -> list:
        for e in self.entries:
            if e[0].name.rstrip("/") == name:
                return e
        raise KeyError(name)

    def has(self, name: str) -> bool:
        try:
            self._find(name)
            return True
        except KeyError:
            return False

    def names(self) -> list[str]:
        return [e[0].name for e in self.entries]

    def resolve(self, name: str) -> str:
        """Follow symlink members (buildah's <v1id>/layer.tar -> ../<diff>.tar)."""
        seen = set()
        while True:
            info = self._find(name)[0]
            if not info.issym():
                return name
            assert name not in seen, f"symlink loop at {name}"
            seen.add(name)
            name = posixpath.normpath(posixpath.join(posixpath.dirname(name), info.linkname))

    def read(self, name: str) -> bytes:
        data = self._find(self.resolve(name))[1]
        assert data is not None, f"{name} is not a regular file"
        return data

    def read_json(self, name: str):
        return json.loads(self.read(name))

    def set(self, name: str, data: bytes) -> None:
        """Replace a member's content; its header stays except for the size."""
        e = self._find(self.resolve(name))
        e[0].size = len(data)
        e[1] = data
        e[2] = None

    def add(self, name: str, data: bytes, like: str | None = None) -> None:
        """Append a regular-file member, with the header fields of member `like`."""
        if like is not None:
            info = copy.copy(self._find(like)[0])
            info.pax_headers = dict(info.pax_headers)
            info.name = name
        else:
            info = tarfile.TarInfo(name)
        info.size = len(data)
        self.entries.append([info, data, None])

    def rename(self, old: str, new: str) -> None:
        e = self._find(old)
        e[0].name = new
        e[2] = None

    def delete(self, name: str) -> None:
        self.entries.remove(self._find(name))

    def write(self, dst: str | Path) -> Path:
        dst = Path(dst)
        with open(dst, "wb") as f:
            for info, data, raw in self.entries:
                if raw is not None:
                    f.write(raw)
                    continue
                f.write(info.tobuf(self.format, tarfile.ENCODING, "surrogateescape"))
                if data:
                    f.write(data)
                    f.write(b"\0" * (-len(data) % tarfile.BLOCKSIZE))
            f.write(self.trailer)
        return dst

    # Image structure ------------------------------------------------------------

    def oci_manifest_name(self) -> str:
        index = self.read_json("index.json")
        descs = index["manifests"]
        assert len(descs) == 1, "fixture archives hold one image"
        return "blobs/sha256/" + descs[0]["digest"].split(":", 1)[1]

    def config_name(self) -> str:
        if self.kind == "docker":
            (ent,) = self.read_json("manifest.json")
            return ent["Config"]
        mani = self.read_json(self.oci_manifest_name())
        return "blobs/sha256/" + mani["config"]["digest"].split(":", 1)[1]

    def layer_names(self) -> list[str]:
        """The member that holds each layer blob, bottom first (symlinks resolved)."""
        if self.kind == "docker":
            (ent,) = self.read_json("manifest.json")
            return [self.resolve(n) for n in ent["Layers"]]
        mani = self.read_json(self.oci_manifest_name())
        return ["blobs/sha256/" + d["digest"].split(":", 1)[1] for d in mani["layers"]]

    def layer_media_types(self) -> list[str | None]:
        if self.kind == "docker":
            return [None] * len(self.layer_names())
        mani = self.read_json(self.oci_manifest_name())
        return [d.get("mediaType") for d in mani["layers"]]

    def replace_oci_manifest(self, new: bytes) -> None:
        """A new manifest blob under its own digest; index.json points at it."""
        old_name = self.oci_manifest_name()
        new_digest = sha256_digest(new)
        self.add("blobs/sha256/" + new_digest.split(":", 1)[1], new, like=old_name)
        self.delete(old_name)
        index = self.read_json("index.json")
        index["manifests"][0]["digest"] = new_digest
        index["manifests"][0]["size"] = len(new)
        self.set("index.json", json.dumps(index, separators=(",", ":")).encode())

    def replace_config(self, new: bytes) -> str:
        """Swap in a new config and fix every digest that names it.

        docker save: the config is renamed <new hex>.json and manifest.json
        points at it.  OCI: a new config blob, a new manifest blob whose config
        descriptor names it, and index.json pointing at the new manifest.
        Returns the new config digest.
        """
        old_name = self.config_name()
        digest = sha256_digest(new)
        hex_ = digest.split(":", 1)[1]
        if self.kind == "docker":
            new_name = posixpath.join(posixpath.dirname(old_name), hex_ + ".json")
            self.set(old_name, new)
            self.rename(old_name, new_name)
            manifest = self.read_json("manifest.json")
            manifest[0]["Config"] = new_name
            self.set("manifest.json", json.dumps(manifest, separators=(",", ":")).encode())
            return digest
        self.add("blobs/sha256/" + hex_, new, like=old_name)
        self.delete(old_name)
        mani = self.read_json(self.oci_manifest_name())
        mani["config"]["digest"] = digest
        mani["config"]["size"] = len(new)
        self.replace_oci_manifest(json.dumps(mani, separators=(",", ":")).encode())
        return digest
