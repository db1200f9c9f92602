"""The documentation keeps up with the code: every config key is in docs/config.md (its key tables are generated
from the field docstrings), and every "docs/design.md, invariant N" cited in keel/ exists."""

import dataclasses
import os
import re
import typing
from pathlib import Path

from keel.config import Config, describe_fields, reference_markdown

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DOC = ROOT / "docs" / "config.md"
BEGIN, END = "<!-- keys: begin (generated) -->\n", "<!-- keys: end -->"


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key a user can set, walking the dataclasses; items of a list of mappings as `key[].name`."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            out += leaf_keys(tp, f"{key}.")
        elif typing.get_origin(tp) is tuple and args[1:] == (Ellipsis,) and dataclasses.is_dataclass(args[0]):
            out += [key, *leaf_keys(args[0], f"{key}[].")]
        else:
            out.append(key)
    return out


def test_every_config_key_is_in_the_config_doc():
    doc = CONFIG_DOC.read_text()
    keys = leaf_keys(Config)
    assert "data.cache_dir" in keys and "data.sources[].path" in keys
    missing = [k for k in keys if f"`{k}`" not in doc]
    assert not missing, f"docs/config.md lacks {missing}"


def test_every_config_field_has_a_docstring():
    assert [d.key for d in describe_fields()] == leaf_keys(Config)
    assert [d.key for d in describe_fields() if not d.doc] == []


def test_config_doc_tables_are_generated_from_the_docstrings():
    doc = CONFIG_DOC.read_text()
    head, rest = doc.split(BEGIN)
    committed, tail = rest.split(END)
    if os.environ.get("KEEL_WRITE_DOCS") == "1":
        CONFIG_DOC.write_text(head + BEGIN + reference_markdown() + END + tail)
        return
    assert committed == reference_markdown(), "docs/config.md is stale: KEEL_WRITE_DOCS=1 pytest tests/test_docs.py"


def test_cited_invariants_exist():
    design = (ROOT / "docs" / "design.md").read_text()
    numbered = {int(n) for n in re.findall(r"^(\d+)\. \*\*", design, re.M)}
    assert numbered == set(range(1, len(numbered) + 1)) and len(numbered) >= 7
    cited = set()
    for path in (ROOT / "keel").rglob("*.py"):
        text = path.read_text()
        assert "design invariant" not in text, f"{path}: cite 'docs/design.md, invariant N'"
        for group in re.findall(r"docs/design\.md, invariants? ([\d, and]+)", text):
            cited |= {int(n) for n in re.findall(r"\d+", group)}
    assert cited and cited <= numbered, cited - numbered
