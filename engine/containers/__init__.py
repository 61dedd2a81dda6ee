"""Containers (writable layers whose writes are events, `commit`) and FUSE mounts of any view.

May import the foundation, ingest (commit ingests its layer tar), output and audit.
"""
