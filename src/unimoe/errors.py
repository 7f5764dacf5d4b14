"""The one exception type that bad user input raises, whatever the input."""

from __future__ import annotations


class UniMoeInputError(ValueError):
    """Bad input: a missing, corrupt or unsupported media file, a malformed record or request,
    a placeholder/media mismatch, or a prompt longer than the model's context.

    The message always names the offending input (a path, a record id, a field).
    """
