"""The API reference is current and every public name has a docstring."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def load_generator():
    spec = importlib.util.spec_from_file_location("make_api", DOCS / "make_api.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_public_name_has_a_docstring():
    missing = [q for q, _, doc in load_generator().entries() if not doc.strip()]
    assert not missing, f"public names without a docstring: {missing}"


def test_reference_is_current():
    assert (DOCS / "api.md").read_text() == load_generator().render(), (
        "docs/api.md is stale: run python docs/make_api.py")


def test_readme_links_resolve():
    readme = (DOCS.parent / "README.md").read_text()
    for doc in ("architecture", "concurrency", "devices", "constants", "batching", "errors",
                "troubleshooting", "api", "serving", "packages", "scaling"):
        assert f"docs/{doc}.md" in readme and (DOCS / f"{doc}.md").is_file()
