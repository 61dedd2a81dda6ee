"""Ingest: archives (docker-save, OCI) and layer tars in, events and contents into the store.

May import the foundation (engine/*.py) only.
"""
