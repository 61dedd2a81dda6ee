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


# Registries (engine/registry) ------------------------------------------------


class RegistryError(LayerdbError):
    """the registry request failed"""

    exit_code = 7


class RegistryUnreachable(RegistryError):
    """the registry cannot be reached (unknown host, connection refused, timeout)"""


class RegistryTLSError(RegistryError):
    """the registry's TLS certificate or handshake was refused"""


class RegistryAuthError(RegistryError):
    """the registry refused the credentials (401 or 403)"""

    exit_code = 8


class RegistryRateLimited(RegistryError):
    """the registry still answers 429 (too many requests) after the retries"""


class RegistryNotFound(NotFound):
    """the registry has no such repository, tag or digest"""


class RegistryProtocolError(RegistryError):
    """the registry answered something layerdb cannot use (media type, size, nesting)"""


class DigestWouldChange(RegistryError):
    """push would change a digest and --preserve-digests forbids it"""


class BuildError(LayerdbError):
    """the build failed"""

    exit_code = 7


class DockerfileError(BuildError):
    """the Dockerfile is not valid"""

    def __init__(self, message: str, file: str | None = None, line: int | None = None):
        self.file, self.line, self.reason = file, line, message
        where = f"{file}:{line}: " if file and line else f"{file}: " if file else ""
        super().__init__(where + message)

    def at(self, file: str, line: int | None) -> "DockerfileError":
        """The same error, placed in a file and line (when it has no place yet)."""
        if self.file:
            return self
        return type(self)(self.reason, file, line)


class ContextError(BuildError):
    """a build source cannot be read from the context"""


class StepFailed(BuildError):
    """a build step failed"""

    def __init__(self, message: str, step: str = "", exit_status: int | None = None, output: str = ""):
        self.step, self.exit_status, self.output = step, exit_status, output
        super().__init__(message)
