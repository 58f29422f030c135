"""The README stands on its own: every link it and docs/ make points inside the repository, and the
contracts page names every exit code and environment variable of the protocol."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from savegame import protocol

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_docs_exist() -> None:
    names = {p.name for p in PAGES}
    assert {"pytorch.md", "keras.md", "tensorflow.md", "lightning.md", "huggingface.md", "cli.md", "api.md",
            "format.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_point_inside_the_repository(page: Path) -> None:
    text = page.read_text()
    assert "DESIGN.md" not in text
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        assert not target.startswith(("http://", "https://")), f"{page.name} points outside: {target}"
        assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_the_contracts_page_names_every_exit_code_and_variable() -> None:
    text = (ROOT / "docs" / "format.md").read_text() + (ROOT / "docs" / "cli.md").read_text()
    for name in dir(protocol):
        if name.startswith("ENV_"):
            assert getattr(protocol, name) in text, name
        if name.startswith("EXIT_"):
            assert f"| {getattr(protocol, name)} |" in text, name
    for event in ("hello", "heartbeat", "committed", "resumed", "saving", "stopping", "finished"):
        assert f"`{event}`" in text, event
