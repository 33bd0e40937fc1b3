"""User-facing texts: one TOML catalogue per language, looked up by dotted key.

Handlers and tasks never hold sentences; they name a key and pass its parameters.
"""

from __future__ import annotations

import tomllib
from functools import cache
from importlib import resources
from typing import Any

DEFAULT_LANGUAGE = "en"
LANGUAGES = ("en", "hi")


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


@cache
def catalogue(language: str) -> dict[str, str]:
    source = resources.files(__package__).joinpath(f"{language}.toml").read_text("utf-8")
    return _flatten(tomllib.loads(source))


def pick_language(language_code: str | None) -> str:
    """The catalogue for a Telegram `language_code` such as "hi" or "en-GB"."""
    if language_code:
        primary = language_code.split("-")[0].lower()
        if primary in LANGUAGES:
            return primary
    return DEFAULT_LANGUAGE


def text(language: str, key: str, **params: Any) -> str:
    """The text for `key` in `language`, falling back to English for a missing key."""
    template = catalogue(language).get(key) or catalogue(DEFAULT_LANGUAGE)[key]
    return template.format(**params) if params else template
