"""Writing a file so that a reader sees the old one or the whole new one, never a part."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def write_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], None], what: str) -> Path:
    """Call ``write(f)`` on a temp file in ``path``'s directory, flush it to disk and rename it
    over ``path``. On failure (a full disk) the temp file is removed, ``path`` is as it was, and
    the ``OSError`` says ``what`` was being written and names ``path``.

    Args:
      path: the target file.
      write: writes the contents into the open binary file it is given.
      what: what the file is, for the error message ("learnopt checkpoint").
    Returns:
      ``path`` as a ``Path``.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the data (a crash would leave an empty file)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the target is an ordinary file
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, f"writing {what} failed ({e.strerror or e}); the file, if it existed, is unchanged",
                      str(path)) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path
