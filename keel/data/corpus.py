"""The embedded default corpus: the running interpreter's standard library sources."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_files() -> tuple[Path, list[Path]]:
    """(root, the .py files under it), sorted, without installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return root, files
