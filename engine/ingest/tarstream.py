"""The tar reader now lives in the foundation (engine/tarstream.py), so that
fsck --deep parses a rebuilt layer tar with the reader import used.  This name
stays for the callers that still import it from here."""

from ..tarstream import TarEntry, TarReader

__all__ = ["TarEntry", "TarReader"]
