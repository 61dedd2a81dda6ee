-- layerdb schema, version 3.  This file is the only place the schema lives;
-- engine/store.py runs it on an empty database and sets PRAGMA user_version.
-- A section that starts with a '-- @version N' line was added in version N:
-- store.py migrates an older store in place by running the sections above
-- its version, in one transaction.
--
-- Shape of the data:
--   chunk   <- blob_chunk -> blob       content, addressed by sha256, zstd chunks
--   path                                every path ever seen, interned (raw bytes)
--   diff    <- event                    one layer tar, stored once, as its entries
--   layer   -> diff, parent layer       a position in a chain (OCI chain_id)
--   image   -> top layer; tag, history  a config and its names
--
-- A diff is shared by every chain that contains it, so its events record what
-- the tar says (put / whiteout / opaque), never "add" or "modify": that depends
-- on the view below, which differs from chain to chain.  engine/replay.py
-- derives add/modify/delete per chain at query time.

-- Content -----------------------------------------------------------------

-- Chunk bytes: the unit of compression.  A chunk is either a pack of small
-- contents compressed together (cross-file redundancy is most of what gzip
-- finds in a layer) or one content-defined piece of a large content (so an
-- in-place edit of a big file stores only the pieces it touched).
-- Kept behind engine/chunks.py (put/get/has/delete by sha256) so that a second
-- backend can hold them elsewhere: nothing else reads this table.
CREATE TABLE chunk (
    id      INTEGER PRIMARY KEY,
    sha256  BLOB NOT NULL UNIQUE,       -- 32 raw bytes of sha256(raw data)
    size    INTEGER NOT NULL,           -- raw size: the decompression bound
    codec   INTEGER NOT NULL,           -- 0 stored raw, 1 zstd
    data    BLOB NOT NULL
);

-- A content (file bytes, or a layer's framing), addressed by its sha256.
-- Small contents live in one chunk (a pack) at an offset; large ones are the
-- concatenation of their blob_chunk rows, and have chunk NULL.
CREATE TABLE blob (
    id      INTEGER PRIMARY KEY,
    sha256  BLOB NOT NULL UNIQUE,       -- 32 raw bytes of sha256(contents)
    size    INTEGER NOT NULL,
    chunk   BLOB,                       -- chunk.sha256 of the pack holding it
    offset  INTEGER                     -- where it starts in the pack's raw bytes
);

CREATE TABLE blob_chunk (
    blob_id INTEGER NOT NULL REFERENCES blob(id) ON DELETE CASCADE,
    seq     INTEGER NOT NULL,
    offset  INTEGER NOT NULL,           -- byte offset of the chunk in the blob
    chunk   BLOB NOT NULL,              -- chunk.sha256 (no foreign key: the chunk may live in another backend)
    PRIMARY KEY (blob_id, seq)
) WITHOUT ROWID;
CREATE INDEX blob_chunk_by_chunk ON blob_chunk(chunk);

-- Paths -------------------------------------------------------------------

-- Raw path bytes relative to the root, no leading or trailing '/', '' is the
-- root itself.  Subtrees are index ranges: path > 'a/b/' AND path < 'a/b0'.
CREATE TABLE path (
    id      INTEGER PRIMARY KEY,
    path    BLOB NOT NULL UNIQUE,
    name    BLOB NOT NULL               -- last component, for find --name
);
CREATE INDEX path_by_name ON path(name);

-- Diffs and their events ----------------------------------------------------

CREATE TABLE diff (
    id          INTEGER PRIMARY KEY,
    diff_id     TEXT NOT NULL UNIQUE,   -- 'sha256:<hex>' of the uncompressed tar
    tar_size    INTEGER NOT NULL,       -- bytes of the uncompressed tar
    file_bytes  INTEGER NOT NULL,       -- regular-file payload bytes in it
    entries     INTEGER NOT NULL,       -- tar entries
    framing     INTEGER REFERENCES blob(id),  -- the tar minus file payloads (lossless rebuild)
    imported    TEXT NOT NULL,          -- ISO 8601 UTC
    -- 1: a container's writable diff (diff_id 'container:<uuid>', no tar, no
    -- framing).  Its events are a time-ordered log: they replay in seq order,
    -- and a whiteout or opaque there removes what is present at that moment,
    -- including the container's own earlier writes.
    container   INTEGER NOT NULL DEFAULT 0
);

-- kind: 0 opaque, 1 whiteout, 2 implied parent directory, 3 put, 4 ignored
-- (AUFS bookkeeping such as .wh..wh.plnk).  Within one diff the replay applies
-- them in that order (opaque and whiteouts only hide lower layers), then puts in
-- tar order; that order is (kind, seq), so the primary key serves it.
-- seq is the tar entry index; implied directories are numbered after the last
-- entry, so seq < diff.entries means "a real tar entry" (needed for the rebuild).
-- type: f d l h p c b; h is a hard link whose target path is target_id.
CREATE TABLE event (
    diff_id     INTEGER NOT NULL REFERENCES diff(id) ON DELETE CASCADE,
    kind        INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    path_id     INTEGER NOT NULL REFERENCES path(id),
    type        TEXT,
    mode        INTEGER,                -- permission bits incl. setuid/setgid/sticky
    uid         INTEGER,
    gid         INTEGER,
    mtime       INTEGER,                -- seconds; fractions stay in the framing
    size        INTEGER,                -- regular files: content size
    blob_id     INTEGER REFERENCES blob(id),
    link        BLOB,                   -- symlink target, raw bytes
    target_id   INTEGER REFERENCES path(id),  -- hard-link target
    devmajor    INTEGER,
    devminor    INTEGER,
    xattrs      TEXT,                   -- JSON {name: hex value}, NULL when none
    time        REAL,                   -- container writes: when (unix seconds); NULL for imported events
    PRIMARY KEY (diff_id, kind, seq)
) WITHOUT ROWID;
-- Depth-free lookups: every event on a path, whatever chain it is in.
CREATE INDEX event_by_path ON event(path_id, diff_id);
-- Which hard links name a path (they change its metadata and share its content).
CREATE INDEX event_by_target ON event(target_id) WHERE target_id IS NOT NULL;
CREATE INDEX event_by_blob ON event(blob_id) WHERE blob_id IS NOT NULL;

-- Chains and images ---------------------------------------------------------

CREATE TABLE layer (
    id          INTEGER PRIMARY KEY,
    chain_id    TEXT NOT NULL UNIQUE,   -- 'sha256:<hex>'
    parent_id   INTEGER REFERENCES layer(id),
    diff_id     INTEGER NOT NULL REFERENCES diff(id),
    position    INTEGER NOT NULL        -- 1 = bottom
);
CREATE INDEX layer_by_parent ON layer(parent_id);
CREATE INDEX layer_by_diff ON layer(diff_id);

CREATE TABLE image (
    id          INTEGER PRIMARY KEY,
    digest      TEXT NOT NULL UNIQUE,   -- 'sha256:<hex>' of the config: the image id
    config      BLOB NOT NULL,          -- the config bytes exactly as imported
    top_layer   INTEGER REFERENCES layer(id),  -- NULL for an image without diffs
    created     TEXT,
    os          TEXT,
    architecture TEXT,
    imported    TEXT NOT NULL
);
CREATE INDEX image_by_top ON image(top_layer);

CREATE TABLE tag (
    name        TEXT PRIMARY KEY,       -- 'repo:tag'
    image_id    INTEGER NOT NULL REFERENCES image(id) ON DELETE CASCADE
);
CREATE INDEX tag_by_image ON tag(image_id);

-- The config's history, one row per entry, in config order.  position is the
-- layer position the entry made (1 = bottom), NULL for empty_layer entries.
CREATE TABLE history (
    image_id    INTEGER NOT NULL REFERENCES image(id) ON DELETE CASCADE,
    idx         INTEGER NOT NULL,
    position    INTEGER,
    created     TEXT,
    created_by  TEXT,
    comment     TEXT,
    empty_layer INTEGER NOT NULL,
    PRIMARY KEY (image_id, idx)
) WITHOUT ROWID;

-- Containers ------------------------------------------------------------------

-- A writable layer on top of an image: its writes are the events of its own
-- diff (diff.container = 1), appended in time order.
CREATE TABLE container (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    image_id    INTEGER NOT NULL REFERENCES image(id),
    layer_id    INTEGER REFERENCES layer(id),   -- the image's top layer (NULL: an image without diffs)
    diff_id     INTEGER NOT NULL UNIQUE REFERENCES diff(id),
    created     TEXT NOT NULL
);
CREATE INDEX container_by_image ON container(image_id);

-- @version 2: registries ---------------------------------------------------------
-- What a pull saw, so that a push can send it back unchanged (engine/registry/records.py).
-- A store of version 1 gets this section when it is opened (engine/store.py).

-- Manifest and index bytes exactly as pulled (or pushed); image_id is NULL for an index.
CREATE TABLE manifest (
    id          INTEGER PRIMARY KEY,
    digest      TEXT NOT NULL UNIQUE,   -- 'sha256:<hex>' of data
    media_type  TEXT NOT NULL,
    data        BLOB NOT NULL,
    image_id    INTEGER REFERENCES image(id) ON DELETE CASCADE,
    added       TEXT NOT NULL           -- ISO 8601 UTC
);
CREATE INDEX manifest_by_image ON manifest(image_id);

-- The image manifests of an index that were stored.
CREATE TABLE manifest_child (
    index_id    INTEGER NOT NULL REFERENCES manifest(id) ON DELETE CASCADE,
    child_id    INTEGER NOT NULL REFERENCES manifest(id) ON DELETE CASCADE,
    PRIMARY KEY (index_id, child_id)
) WITHOUT ROWID;
CREATE INDEX manifest_child_by_child ON manifest_child(child_id);

-- A manifest's layer descriptors, in manifest order, beside the diff each one holds.
CREATE TABLE manifest_layer (
    manifest_id INTEGER NOT NULL REFERENCES manifest(id) ON DELETE CASCADE,
    idx         INTEGER NOT NULL,       -- 0 = bottom
    digest      TEXT NOT NULL,          -- the compressed blob's digest
    media_type  TEXT NOT NULL,
    size        INTEGER NOT NULL,
    annotations TEXT,                   -- JSON object, NULL when none
    diff_id     TEXT NOT NULL,          -- diff.diff_id of its uncompressed tar
    PRIMARY KEY (manifest_id, idx)
) WITHOUT ROWID;
CREATE INDEX manifest_layer_by_diff ON manifest_layer(diff_id);

-- Where a blob or manifest digest was seen: push mounts from there.
CREATE TABLE seen (
    digest      TEXT NOT NULL,
    registry    TEXT NOT NULL,          -- host[:port], 'docker.io' for Docker Hub
    repository  TEXT NOT NULL,
    PRIMARY KEY (digest, registry, repository)
) WITHOUT ROWID;

-- @version 3: builds ------------------------------------------------------------------
-- The layer cache of `layerdb build` (engine/build/builder.py): one row per step built.
-- Rows are weak: gc may drop a layer only a cache row names, and that step then misses.
CREATE TABLE build_cache (
    key     TEXT PRIMARY KEY,   -- sha256 of the parent's key and this step's inputs
    parent  TEXT NOT NULL,      -- the parent step's key
    step    TEXT NOT NULL,      -- the instruction as written
    inputs  TEXT NOT NULL,      -- JSON: what the key was made of (to explain a miss)
    diff_id TEXT,               -- the layer a RUN/COPY/ADD made (NULL for the other steps)
    created TEXT NOT NULL,      -- the history time, so that a cached rebuild is the same image
    used    TEXT NOT NULL
);
CREATE INDEX build_cache_by_step ON build_cache(parent, step);

-- @version 4: per-entry content tags ------------------------------------------------
-- For each tar entry with a payload, in seq order, the first 8 bytes of the sha256 of
-- the bytes it held at import: a blob of concatenated tags (engine/upkeep/deep.py).
-- The diff_id alone vouches for the layer; the tags let fsck --deep name the entry
-- whose content changed.  NULL for diffs imported before version 4 and for containers.
ALTER TABLE diff ADD COLUMN digests INTEGER REFERENCES blob(id);
