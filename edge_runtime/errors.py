"""User-facing errors: one line that names the file and says what to do about it."""

# Exit codes that scripts can trust, shared by every command.
EXIT_OK = 0
EXIT_SOME_FAILED = 1  # the batch ran, but some inputs were skipped (listed in the output)
EXIT_USAGE = 2  # bad arguments or unusable input: nothing was done


class OncoliteError(Exception):
    """An error caused by input the user can fix; the CLI prints it as one line, no traceback."""


class ImageError(OncoliteError):
    """An image that cannot be read or is unsafe to decode."""


class ModelError(OncoliteError):
    """A model file that is missing, corrupt, or does not match its labels or sidecar."""


class ManifestError(OncoliteError):
    """A manifest with missing files, hash mismatches or leakage across sides."""
