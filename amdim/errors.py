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


class DivergedError(UserError):
    """Training produced a non-finite loss: the run stops at once and is not a result."""

    def __init__(self, epoch: int, step: int):
        self.epoch, self.step = epoch, step
        super().__init__(
            f"training diverged: the loss is not finite at epoch {epoch}, step {step} of the epoch; "
            "nothing of this run is a result (lower optim.lr, or keep the NCE stabilisers "
            "loss.tclip and loss.reg_weight on)"
        )
