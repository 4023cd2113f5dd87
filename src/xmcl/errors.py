"""Errors that reach the user as one clear line naming the file, field or value at fault."""


class XmclError(Exception):
    """Base class: the CLI prints the message and exits with status 2, without a traceback."""


class DataError(XmclError):
    """Input data is missing or malformed; the message names the file and what is wrong."""


class ConfigError(XmclError):
    """A configuration file or override is invalid; the message names the key and value."""


class CheckpointError(XmclError):
    """A checkpoint or cache is missing, corrupt or does not match what asks for it."""


class TrainingDiverged(XmclError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingStalled(XmclError):
    """The loss gives no gradient at all, so training cannot start; the message says what to change."""
