"""The one exception hierarchy of layerdb.

Every error a user can cause (bad input, unknown names, a store made by a newer
layerdb) is a LayerdbError: the CLI prints its message as one line and exits
with its exit_code.  Anything else is a bug and keeps its traceback.
"""


class LayerdbError(Exception):
    """layerdb error"""

    exit_code = 1

    def __init__(self, message: str | None = None):
        super().__init__(message or self.__doc__)

    @property
    def message(self) -> str:
        return str(self.args[0])


class UsageError(LayerdbError):
    """invalid arguments"""

    exit_code = 2


class StoreError(LayerdbError):
    """the store cannot be used"""

    exit_code = 3


class SchemaTooNew(StoreError):
    """the store was written by a newer layerdb"""


class ArchiveError(LayerdbError):
    """the archive cannot be imported"""

    exit_code = 4


class DigestMismatch(ArchiveError):
    """a digest in the archive does not match its contents"""

    def __init__(self, what: str, expected: str, got: str):
        self.what, self.expected, self.got = what, expected, got
        super().__init__(f"{what}: digest mismatch: expected {expected}, got {got}")


class LayerFormatError(ArchiveError):
    """a layer tar is malformed"""


class NotFound(LayerdbError):
    """no such object"""

    exit_code = 5


class AmbiguousRef(NotFound):
    """a reference matches more than one object"""


def _show(path: bytes) -> str:
    return "/" + path.decode("utf-8", "surrogateescape")


class PathError(UsageError):
    """a container path operation failed"""

    def __init__(self, code: int, path: bytes, message: str | None = None):
        import os

        self.errno = code  # the FUSE mount answers with it
        super().__init__(f"{_show(path)}: {message or os.strerror(code)}")


class NoSuchPath(NotFound):
    """no such file or directory"""

    errno = 2  # ENOENT

    def __init__(self, path: bytes, message: str | None = None):
        super().__init__(f"{_show(path)}: {message or 'no such file or directory'}")


class WasteCheckFailed(LayerdbError):
    """the image fails the waste thresholds (waste --ci)"""

    exit_code = 1


class CorruptStore(StoreError):
    """stored data fails its checksum"""

    exit_code = 6
