"""User-facing errors: each becomes one line on stderr and exit code 2 at the CLI boundary."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (spec, data, checkpoint, device): reported in one line, exit 2."""


class ConfigError(UserError, ValueError):
    """An invalid configuration field. The message starts with the field's flat name."""


class DataError(UserError):
    """A missing or malformed dataset."""


class CheckpointError(UserError):
    """A missing, corrupt or incompatible checkpoint."""
