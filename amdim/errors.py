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


def repeats_on_retry(exc: BaseException) -> str | None:
    """One line saying why ``exc`` would happen again if the same work ran again, or None.

    A user error (data that cannot be read, an invalid configuration, a checkpoint that does not
    fit) and running out of memory (``torch.OutOfMemoryError``: CUDA out of memory; ``MemoryError``)
    are properties of the work: retrying repeats them. A process that crashed or was killed, a lost
    node, a flaky file system: anything else may well pass on a retry.
    """
    import sys

    torch = sys.modules.get("torch")
    memory = (MemoryError, torch.OutOfMemoryError) if torch is not None else (MemoryError,)
    if not isinstance(exc, (UserError, *memory)):
        return None
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    kind = "out of memory" if isinstance(exc, memory) else type(exc).__name__
    return f"{kind}: {text}" if text else kind
