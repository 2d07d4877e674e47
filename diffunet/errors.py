"""The one exception type for bad user input: the CLI prints it on one line and exits non-zero."""


class UserError(Exception):
    """Bad input from the user (data, checkpoint, flag). The message names the fix."""


class DataError(UserError):
    """A dataset path, file or array that cannot be used."""


class CheckpointError(UserError):
    """A checkpoint or run folder that cannot be loaded."""
