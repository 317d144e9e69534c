"""Version numbers: model versions on disk, and release strings of the tools the kit checks.

`numeric_versions`: model versions on disk, `<base_path>/<N>/`, the layout TF Serving watches.

One rule for the exporter (which picks the next number) and the local server (which loads
what is there), so both see the same versions. TF Serving's own rule is
tensorflow_serving/sources/storage_path/file_system_storage_path_source.cc (a child folder
whose name parses as a non-negative int64); this one is stricter where a looser name could
be misread:

- only ASCII digits (`isdigit` alone would take other scripts' digits),
- at most int64's maximum (TF Serving's version type),
- canonical form only: `1`, not `01`, since every caller addresses version N as
  `base_path / str(N)`, which would be another folder,
- a base path that is missing, not a folder or unreadable holds no versions.

`version_tuple`: a release string (TensorFlow, CUDA, cuDNN, a compute capability) as a tuple
to compare.
"""

from __future__ import annotations

import re
from pathlib import Path

MAX_VERSION = 2**63 - 1  # int64: TF Serving's version numbers


def parse_version(name: str) -> int | None:
    """The version number a folder named `name` holds, or None if it is not a version folder."""
    if not (name.isascii() and name.isdigit()) or str(int(name)) != name:
        return None
    number = int(name)
    return number if number <= MAX_VERSION else None


def numeric_versions(base_path: Path) -> list[int]:
    """The version folders under `base_path`, ascending, as int (see the module's rules).

    Other entries (`.tmp-export-*`, `.last_version`, files, `01`) are ignored; a missing or
    unreadable `base_path` gives [].
    """
    try:
        entries = list(Path(base_path).iterdir())
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    versions = set()
    for entry in entries:
        number = parse_version(entry.name)
        if number is not None and entry.is_dir():
            versions.add(number)
    return sorted(versions)


def version_tuple(text: str) -> tuple[int, ...]:
    """A release string's (major, minor, patch), for comparing: '2.21.0-rc1' -> (2, 21, 0),
    '12.5' -> (12, 5, 0).

    Raises ValueError when `text` does not start with `major.minor`.
    """
    match = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        raise ValueError(f"not a version number: {text!r}")
    return tuple(int(g or 0) for g in match.groups())
