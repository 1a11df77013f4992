"""The docs cannot rot: every study-file key is documented, the README stays short and its study
file valid, and every relative link in the README and docs/ leads to a file (and heading) that exists."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from ftsearch.config import FloatRange, IntRange, StudyConfig, validate

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
STUDY_FILES_DOC = ROOT / "docs" / "study-files.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
INTERNAL_FIELDS = {"source"}  # set by the loader, never written in a study file
# Value types used by many keys ({low, high, log}): documented once, not under every key.
VALUE_TYPES = (FloatRange, IntRange)


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation: ``M``, ``M | None``, ``list[M]``, ``Optional[M]``..."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) or typing.get_args(annotation):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def study_keys(model: type[BaseModel] = StudyConfig, prefix: str = "") -> list[str]:
    """Every dotted key of a study file: sections (``data``) and the keys inside them (``data.dataset``)."""
    keys = []
    for name, field in model.model_fields.items():
        if not prefix and name in INTERNAL_FIELDS:
            continue
        key = f"{prefix}{name}"
        keys.append(key)
        # A table of named entries (``constraints: {latency_ms: {max: 20}}``): ``constraints.<name>.max``.
        inner = f"{key}.<name>." if typing.get_origin(field.annotation) is dict else f"{key}."
        for nested in _models_in(field.annotation):
            if not issubclass(nested, VALUE_TYPES):
                keys += study_keys(nested, inner)
    return keys


def test_the_walk_finds_nested_and_optional_keys():
    keys = study_keys()
    assert {"data.dataset", "search.lr", "search.augment.token_mask", "sampler.startup_trials",
            "pruner.min_epochs", "cpu_plan", "constraints.<name>.max"} <= set(keys)
    assert "source" not in keys and "search.lr.low" not in keys


def test_every_study_file_key_is_in_study_files_md():
    text = STUDY_FILES_DOC.read_text(encoding="utf-8")
    missing = [key for key in study_keys() if f"`{key}`" not in text]
    assert not missing, f"keys of ftsearch.config.StudyConfig missing from docs/study-files.md (as `key`): {', '.join(missing)}"


def test_the_range_value_types_are_documented():
    text = STUDY_FILES_DOC.read_text(encoding="utf-8")
    fields = {name for model in VALUE_TYPES for name in model.model_fields}
    missing = sorted(name for name in fields if f"`{name}`" not in text)
    assert not missing, f"fields of the range types missing from docs/study-files.md: {', '.join(missing)}"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 160, f"README.md has {len(lines)} lines; keep it to about 150 and move reference to docs/"


def _yaml_blocks(text: str) -> list[str]:
    return re.findall(r"^```ya?ml\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def test_readme_study_file_validates():
    blocks = _yaml_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "README.md shows no ```yaml study file"
    for block in blocks:
        raw = yaml.safe_load(block)
        config = validate(raw | {"name": "readme"}, README)
        assert config.backbones and config.registered_model


_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^```.*?^```", flags=re.MULTILINE | re.DOTALL)


def _links(text: str) -> list[str]:
    return _LINK.findall(_FENCE.sub("", text))


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -1, -2 for repeats."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", _FENCE.sub("", path.read_text(encoding="utf-8")), flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_relative_links_lead_somewhere(doc):
    broken = []
    for target in _links(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.IGNORECASE):
            continue  # http:, https:, mailto:
        path_part, _, anchor = target.partition("#")
        path = (doc.parent / path_part).resolve() if path_part else doc
        if not path.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target} (no heading #{anchor} in {path.relative_to(ROOT)})")
    assert not broken, f"broken links in {doc.relative_to(ROOT)}: {'; '.join(broken)}"
