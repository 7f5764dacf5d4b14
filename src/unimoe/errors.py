"""The package's exception types: bad input data, and bad configuration.

Command-line exit codes follow them: 2 for a configuration error (fix the command or recipe), 3 for
unusable input data (fix the data), 1 for anything else.
"""

from __future__ import annotations

EXIT_CONFIG_ERROR = 2
EXIT_INPUT_ERROR = 3


class UniMoeInputError(ValueError):
    """Bad input: a missing, corrupt or unsupported media file, a malformed record or request,
    a placeholder/media mismatch, a prompt longer than the model's context, or a data set with no
    usable sample.

    The message always names the offending input (a path, a record id, a field).
    """


class UniMoeConfigError(ValueError):
    """An invalid or inconsistent configuration (a recipe, a model directory that does not fit it, a
    launch that does not fit the requested distribution); the message names the settings at fault."""
