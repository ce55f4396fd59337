"""Reading the text and JSON files users hand the project, with errors that name the file.

Python's own errors for a non-UTF-8 or malformed file (``UnicodeDecodeError``,
``JSONDecodeError``) say what went wrong but not in which file; these helpers raise a
``ValueError`` that starts with the path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_text(path: str | Path, what: str = "file", encoding: str = "utf-8") -> str:
    """The text of ``path``.

    Args:
        path: the file.
        what: how the file is named when it is missing (``"WikiText file"``).
        encoding: the file's encoding.

    Raises:
        FileNotFoundError: ``path`` is not a file. ValueError: the bytes are not ``encoding`` text,
            or the encoding is unknown.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not {encoding} text (byte {error.start}: {error.reason}); convert the file to {encoding}"
        ) from None
    except LookupError:
        raise ValueError(f"{path}: unknown encoding {encoding!r}; give a Python codec name such as 'utf-8'") from None


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """The parsed JSON of ``path`` (UTF-8); errors as in :func:`read_text`, and a ValueError
    naming the line and column of malformed JSON."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: malformed JSON at line {error.lineno} column {error.colno}: {error.msg}") from None
