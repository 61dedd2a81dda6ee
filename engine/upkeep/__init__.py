"""Upkeep of a store: `fsck`, `stats`, `rm` and `gc`.

May import the foundation and output (fsck rebuilds layer tars to check them).
"""
