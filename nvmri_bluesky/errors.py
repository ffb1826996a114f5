"""The one exception type the `nvmri` command turns into a one-line error."""


class NvmriError(Exception):
    """A user-facing error: its message is one readable line, no traceback needed."""
