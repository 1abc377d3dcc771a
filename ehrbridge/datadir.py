"""Data directories hold PHI: only the account that runs ehrbridge may read them.

Every store (the embedded log, state, results, patient links, subscription
ledger, Kafka state) is a file under ``data_dir``. :func:`secure_data_dir`
runs before any of them opens:

* a data directory that group or others can read, write or enter is refused
  with the path named (``error: data_dir: ...``, exit 2): someone gave it
  those bits, and ehrbridge does not quietly take them away;
* a new one is created ``0700``; the process umask becomes ``077``, so every
  file created after that -- SQLite databases and their ``-wal``/``-shm``
  files, dead letters, the sandbox's ``ehr-inbox.hl7`` -- is ``0600``;
* files and folders already inside (from an older version) are tightened to
  ``0600``/``0700``.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from ehrbridge.core.errors import ConfigError

log = logging.getLogger(__name__)
PRIVATE_UMASK = 0o077


def secure_data_dir(path: Path, field: str = "data_dir") -> Path:
    """Create ``path`` private, or check an existing one is; tighten what is inside."""
    os.umask(PRIVATE_UMASK)
    if path.exists():
        refuse_if_shared(path, field)
    else:
        path.mkdir(parents=True, mode=0o700)
        os.chmod(path, 0o700)  # mkdir's mode is masked; say it outright
    tighten_contents(path)
    return path


def refuse_if_shared(path: Path, field: str) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory", field=field)
    if mode & 0o077:
        raise ConfigError(
            f"{path} is open to group or others (mode {mode:04o}); it holds patient data. "
            f"Make it private (chmod 700 {path}) or choose another directory",
            field=field,
        )


def tighten_contents(path: Path) -> None:
    """Files 0600, folders 0700, below ``path`` (what an older version left 0644)."""
    for folder, folders, files in os.walk(path):
        for name in folders:
            _chmod(Path(folder) / name, 0o700)
        for name in files:
            _chmod(Path(folder) / name, 0o600)


def _chmod(path: Path, mode: int) -> None:
    try:
        if stat.S_IMODE(path.lstat().st_mode) & 0o077 and not path.is_symlink():
            os.chmod(path, mode)
    except OSError as exc:  # another account's file: say so, the refusal check is the guard
        log.warning("cannot make %s private: %s", path.name, exc.strerror)
