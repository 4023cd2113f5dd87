"""Reading the text files of a corpus with errors that name the file."""

from __future__ import annotations

from pathlib import Path

from xmcl.errors import DataError


def read_text(path: Path, what: str = "file") -> str:
    """The UTF-8 text of ``path``; ``DataError`` naming the file (as ``what``) if it is missing or unreadable."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such {what}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the {what} ({err})") from None
