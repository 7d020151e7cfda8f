"""Errors that a user can fix (bad recipe, bad path, corrupt file): the CLI prints them in one
line and exits 2, without a traceback. Anything else is a failure of ours (exit 1)."""


class UserError(Exception):
    """Base class of errors whose message says what is wrong and how to fix it."""


class OutputExistsError(UserError, FileExistsError):
    """The output folder exists and is not empty, and overwriting was not asked for."""


class ModelSourceError(UserError, OSError):
    """A model that cannot be found or loaded from where the user pointed."""


class DataError(UserError, ValueError):
    """Text data that cannot be found, read or is too short for the job."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is truncated, corrupt, or missing tensors its config promises."""


class CalibrationError(UserError, ValueError):
    """The model does not run on calibration token windows (it needs other inputs)."""


class StageError(UserError, RuntimeError):
    """A stage's result that must not be used or saved (non-finite weights), with the likely cause."""
