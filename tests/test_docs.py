"""The README stays a short front page whose links resolve; the docs' methods catalogue covers the registry.

(`mkdocs build --strict`, run by .ci/run through scripts/docs.sh, checks every page's links and references.)
"""

import importlib.util
import re
from pathlib import Path

import kvsqueeze

ROOT = Path(__file__).resolve().parent.parent


def hooks():
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "scripts" / "mkdocs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if not t.startswith(("http://", "https://"))]
    assert "docs/getting-started.md" in local and "docs/methods.md" in local
    for target in local:
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def test_every_docs_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in (ROOT / "docs").rglob("*.md"):
        assert str(page.relative_to(ROOT / "docs")) in nav, f"{page} is not in mkdocs.yml's nav"


def test_the_catalogue_covers_every_registered_method():
    module = hooks()
    catalogue, api = module.catalogue(), module.api_methods()
    methods_page = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    assert module.MARKER in methods_page
    for name, cls in kvsqueeze.available().items():
        assert f"## `{name}` {{#{name}}}" in catalogue and cls.summary() in catalogue
        assert f"[`kvsqueeze.{cls.__name__}`][{cls.__module__}.{cls.__name__}]" in catalogue
        assert f"::: {cls.__module__}.{cls.__name__}" in api
        assert getattr(kvsqueeze, cls.__name__) is cls  # the catalogue names it kvsqueeze.<class>
    snapkv = catalogue[catalogue.index("## `snapkv`"):]
    assert "[2404.14469](https://arxiv.org/abs/2404.14469)" in snapkv.split("\n## ")[0]
    assert "`window_size=32`" in snapkv.split("\n## ")[0]


def test_the_changelog_starts_with_this_release():
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "Keep a Changelog" in changelog and "## [Unreleased]" in changelog
    assert f"## [{kvsqueeze.__version__}]" in changelog
