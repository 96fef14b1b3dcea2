"""Errors a user can act on. Anything else that escapes is a bug (CLI exit status 1)."""


class StudioError(Exception):
    """Bad input or a situation the user can fix; the message says how (CLI exit status 2)."""


class ModelLoadError(StudioError):
    """The model could not be opened: missing, not a causal LM, corrupt, or too large."""


class NotEnoughMemory(ModelLoadError):
    """Loading would need more memory than the machine has available."""


class Cancelled(Exception):
    """A job was cancelled by the user. Not an error: nothing it touched has changed."""
