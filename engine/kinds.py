"""Event kinds, in the order a diff's events replay (see schema.sql, table event)."""

OPAQUE, WHITEOUT, IMPLIED, PUT, IGNORED = 0, 1, 2, 3, 4
KIND_NAMES = {OPAQUE: "opaque", WHITEOUT: "whiteout", IMPLIED: "implied", PUT: "put", IGNORED: "ignored"}
