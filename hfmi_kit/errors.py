"""Exceptions raised where bad input enters hfmi_kit.

Every message names the file, variable or parameter and says what was expected and what was
found, so a user can fix the input without reading the code.
"""

from __future__ import annotations


class HfmiError(Exception):
    """Base class of every error hfmi_kit raises on purpose."""


class ConfigError(HfmiError, ValueError):
    """A configuration or parameter value is invalid."""


class DataError(HfmiError, ValueError):
    """Input data is malformed: missing variable, wrong axis, NaNs, wrong units or shape."""


class CheckpointError(HfmiError):
    """A checkpoint directory is missing a file, is corrupt, or was written by a newer version."""


class GeometryMismatchError(HfmiError, ValueError):
    """Data does not match the geometry (variables, grid, units) a checkpoint expects."""


class NonFiniteLossError(HfmiError, FloatingPointError):
    """Training produced a NaN or infinite loss; training stops and checkpoints stay intact."""


class NotebookError(HfmiError):
    """A notebook run failed: a cell raised, or the kernel died."""


class PreemptedError(HfmiError):
    """Training stopped on a pre-emption signal after writing a checkpoint; rerun to resume.

    The command line exits with :data:`REQUEUE_EXIT_CODE`, which the SLURM script reads as
    "requeue me".
    """

    def __init__(self, message: str, *, step: int = 0, checkpoint: object = None) -> None:
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


REQUEUE_EXIT_CODE = 85  # a pre-empted run that checkpointed and wants to be requeued
