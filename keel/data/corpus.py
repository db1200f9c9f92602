"""Text corpora: the embedded default (the running interpreter's standard library) or a glob of text files."""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from keel.config import ConfigError

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclass
class Corpus:
    documents: list[Document]
    content_hash: str
    skipped: dict[str, str] = field(default_factory=dict)  # name -> reason

    def split(self, heldout_fraction: float) -> tuple[list[Document], list[Document]]:
        """Deterministic split by a hash of the document name, so adding documents never moves others."""
        train, heldout = [], []
        for doc in self.documents:
            h = int.from_bytes(hashlib.sha256(doc.name.encode()).digest()[:8], "big") / 2**64
            (heldout if h < heldout_fraction else train).append(doc)
        if not train or not heldout:
            raise ConfigError(
                f"data.heldout_fraction={heldout_fraction} leaves {len(train)} training and {len(heldout)} "
                f"held-out documents out of {len(self.documents)}; both must be non-empty"
            )
        return train, heldout


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return root, files


def load_corpus(spec: str) -> Corpus:
    """`spec` is "stdlib" or a glob (recursive `**` allowed) of UTF-8 text files."""
    if spec == "stdlib":
        root, files = stdlib_files()
    else:
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        root = Path(os.path.commonpath([str(f.parent) for f in files])) if files else Path(".")
    if not files:
        raise ConfigError(f"data.corpus={spec!r} matches no files")
    digest = hashlib.sha256()
    docs: list[Document] = []
    skipped: dict[str, str] = {}
    for path in files:
        name = str(path.relative_to(root))
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            skipped[name] = f"not UTF-8 at byte {e.start}"
            continue
        if not text.strip():
            skipped[name] = "empty"
            continue
        digest.update(name.encode() + b"\0" + raw + b"\0")
        docs.append(Document(name, text))
    if not docs:
        raise ConfigError(f"data.corpus={spec!r}: none of {len(files)} files is usable text ({skipped})")
    return Corpus(docs, digest.hexdigest()[:16], skipped)
