"""Errors that reach the user as one clear line naming the file, field or value at fault."""


class XmclError(Exception):
    """Base class: the CLI prints the message and exits with ``exit_code`` (2), without a traceback."""

    exit_code = 2


class DataError(XmclError):
    """Input data is missing or malformed; the message names the file and what is wrong."""


class ConfigError(XmclError):
    """A configuration file or override is invalid; the message names the key and value."""


class CheckpointError(XmclError):
    """A checkpoint or cache is missing, corrupt, unsafe to load, or does not match what asks for it."""


class RunFolderError(XmclError):
    """An output folder is in use by another process, already holds another run, or cannot hold the output."""


class WriteError(XmclError):
    """A file could not be written (disk full, file too large, no permission); the message names it, and the
    previous version of the file is kept."""


class RunInterrupted(XmclError):
    """SIGINT or SIGTERM stopped a run at a step boundary after saving its checkpoint; the message says how to
    resume. Exit status 130, as for an interrupted command."""

    exit_code = 130


class TrainingDiverged(XmclError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingStalled(XmclError):
    """The loss gives no gradient at all, so training cannot start; the message says what to change."""


def brief(error: BaseException, lines: int = 2, limit: int = 300) -> str:
    """The first ``lines`` non-empty lines of ``error``'s message joined on one line, at most ``limit`` characters
    (e.g. torch's "Error(s) in loading state_dict for M: Missing key(s) in state_dict: ...")."""
    parts = [line.strip() for line in str(error).splitlines() if line.strip()][:lines]
    text = " ".join(parts) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
