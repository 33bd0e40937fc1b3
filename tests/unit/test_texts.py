"""The text catalogues: complete in every language, and every key the code names exists."""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest

from chitrakar.texts import LANGUAGES, catalogue, pick_language, text

ROOT = Path(__file__).resolve().parents[2]


def placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


@pytest.mark.parametrize("language", [lang for lang in LANGUAGES if lang != "en"])
def test_every_language_has_every_text_with_the_same_placeholders(language: str) -> None:
    english, other = catalogue("en"), catalogue(language)
    assert set(other) == set(english)
    for key, template in english.items():
        assert placeholders(other[key]) == placeholders(template), key


def keys_named_in_the_code() -> set[str]:
    named: set[str] = set()
    pattern = re.compile(
        r'"((?:start|help|usage|error|status|result|photo|avatar|styles|button|quota|cancel|history|privacy|export|forget|admin|moderation|service|safety|settings|report|web|edit)\.[a-z_]+)"'
    )
    for package in ("bot", "workers", "chitrakar"):
        for path in (ROOT / package).rglob("*.py"):
            named |= set(pattern.findall(path.read_text("utf-8")))
    # The web chat's templates: t("web.send") or t('web.send').
    in_templates = re.compile(r"""\bt\(["']([a-z]+\.[a-z_]+)["']""")
    for path in (ROOT / "bot" / "web" / "templates").glob("*.html"):
        named |= set(in_templates.findall(path.read_text("utf-8")))
    # The command menu is built from the menu's commands: menu.<command>.
    from chitrakar.domain import MENU

    named |= {f"menu.{command}" for command in MENU}
    return named


def test_every_key_named_in_the_code_exists_and_every_text_is_used() -> None:
    named, catalogued = keys_named_in_the_code(), set(catalogue("en"))
    assert len(named) > 10, "the scan found too few keys: its pattern is out of date"
    assert named - catalogued == set(), "named in the code but missing from the catalogue"
    assert catalogued - named == set(), "in the catalogue but used nowhere"


def test_menu_texts_fit_telegram_limits() -> None:
    for language in LANGUAGES:
        for key, value in catalogue(language).items():
            if key.startswith("menu."):
                assert 1 <= len(value) <= 256


@pytest.mark.parametrize(
    ("code", "language"),
    [("hi", "hi"), ("hi-IN", "hi"), ("en-GB", "en"), ("ta", "en"), (None, "en"), ("", "en")],
)
def test_language_from_telegram_code(code: str | None, language: str) -> None:
    assert pick_language(code) == language


def test_rendering_fills_placeholders() -> None:
    assert text("hi", "status.queued", position=3) == "कतार में है। आपका नंबर: 3।"
    caption = text("en", "result.caption", seed=1, steps=4, width=64, height=64, seconds=0.25)
    assert caption == "Seed 1 · 4 steps · 64×64 · 0.2 s"
