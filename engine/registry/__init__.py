"""Registries: references, transport (urllib3), auth and credentials, manifests, pull and push.

May import the engine foundation (errors, log, store, content, chunks, refs, replay) and the ingest and output packages; never engine/api.py.
"""
