"""The style catalogue: named prompt templates and generation settings users pick by key.

The built-in catalogue is data, `styles.toml` next to this module. An operator's override file
of the same shape replaces built-in entries whole, adds new ones, hides built-ins, or changes
`[defaults]`, without editing the package:

    [defaults]
    style = "watercolour"

    [styles.anime]          # only `enabled`: hides the built-in "anime"
    enabled = false

    [styles.my-brand]       # a new style; a relative LoRA path is read from this file's folder
    name = { en = "My brand" }
    ...
    lora = "loras/my-brand.safetensors"

`load_catalogue` reads and checks both files once, at start-up; a mistake raises
`CatalogueError` with one line that names the file, the style and the field.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from chitrakar.domain import ASPECT_RATIOS, MAX_PROMPT_CHARS, STEPS_RANGE

# styles.py -> styles.toml, the package data file beside this module.
BUILTIN_CATALOGUE = Path(__file__).with_suffix(".toml")

PLACEHOLDER = "{prompt}"
DEFAULT_LANGUAGE = "en"
# Every built-in style speaks these; an operator's own styles need only English.
BUILTIN_LANGUAGES = ("en", "hi")

# A key is typed by users and travels in Telegram callback data (64 bytes in all), so it is
# short and plain.
KEY_PATTERN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
MAX_KEY_CHARS = 32
_LANGUAGE_PATTERN = re.compile(r"[a-z]{2,3}(?:-[a-z0-9]{2,8})*")
MAX_NAME_CHARS = 64
MAX_DESCRIPTION_CHARS = 200
GUIDANCE_RANGE = (0.0, 30.0)
STRENGTH_RANGE = (0.05, 1.0)
LORA_SCALE_RANGE = (0.0, 2.0)

# Validation context keys: the folder a relative LoRA path is read from, and the languages
# every name and description must have.
CONTEXT_BASE_DIR = "base_dir"
CONTEXT_LANGUAGES = "languages"


class CatalogueError(ValueError):
    """A style catalogue file that cannot be used. The message is one line for a start-up log."""


def normalise_key(text: str) -> str:
    """How a user may write a key: any case, with spaces or underscores for hyphens."""
    return re.sub(r"[\s_-]+", "-", text.strip().lower()).strip("-")


def _check_key(key: str) -> str:
    if len(key) > MAX_KEY_CHARS or not KEY_PATTERN.fullmatch(key):
        raise ValueError(
            f"must be lowercase letters and digits joined by hyphens, at most "
            f"{MAX_KEY_CHARS} characters (got {key!r})"
        )
    return key


def _check_texts(texts: dict[str, str], max_chars: int) -> dict[str, str]:
    if DEFAULT_LANGUAGE not in texts:
        raise ValueError(f"needs an {DEFAULT_LANGUAGE!r} entry")
    for language, value in texts.items():
        if not _LANGUAGE_PATTERN.fullmatch(language):
            raise ValueError(f"{language!r} is not a lowercase language code such as 'hi'")
        if not value.strip():
            raise ValueError(f"{language!r} is empty")
        if "\n" in value or "\r" in value:
            raise ValueError(f"{language!r} must be one line")
        if len(value) > max_chars:
            raise ValueError(f"{language!r} is longer than {max_chars} characters")
    return texts


def _in_language(texts: dict[str, str], language: str) -> str:
    language = language.lower()
    return texts.get(language) or texts.get(language.split("-")[0]) or texts[DEFAULT_LANGUAGE]


class Style(BaseModel):
    """One catalogue entry. `key` comes from the table name, `[styles.<key>]`."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    key: str
    name: dict[str, str]
    description: dict[str, str]
    prompt: str
    negative: str = ""
    steps: int = Field(ge=STEPS_RANGE[0], le=STEPS_RANGE[1])
    guidance: float = Field(ge=GUIDANCE_RANGE[0], le=GUIDANCE_RANGE[1])
    aspect_ratio: str
    strength: float = Field(ge=STRENGTH_RANGE[0], le=STRENGTH_RANGE[1])
    # Absolute once validated; the GPU worker checks that the file exists.
    lora: Path | None = None
    lora_scale: float = Field(default=1.0, ge=LORA_SCALE_RANGE[0], le=LORA_SCALE_RANGE[1])
    enabled: bool = True

    @field_validator("key")
    @classmethod
    def _key_shape(cls, key: str) -> str:
        return _check_key(key)

    @field_validator("name")
    @classmethod
    def _name_shape(cls, name: dict[str, str]) -> dict[str, str]:
        return _check_texts(name, MAX_NAME_CHARS)

    @field_validator("description")
    @classmethod
    def _description_shape(cls, description: dict[str, str]) -> dict[str, str]:
        return _check_texts(description, MAX_DESCRIPTION_CHARS)

    @field_validator("prompt")
    @classmethod
    def _one_placeholder(cls, prompt: str) -> str:
        count = prompt.count(PLACEHOLDER)
        if count != 1:
            raise ValueError(f"must contain {PLACEHOLDER} exactly once (found {count})")
        rest = prompt.replace(PLACEHOLDER, "")
        if "{" in rest or "}" in rest:
            others = re.findall(r"\{[^{}]*\}", rest)
            found = ", ".join(others) if others else "a stray brace"
            raise ValueError(f"may contain no placeholder but {PLACEHOLDER} (found {found})")
        return prompt

    @field_validator("aspect_ratio")
    @classmethod
    def _known_ratio(cls, aspect_ratio: str) -> str:
        if aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"{aspect_ratio!r} is not one of {', '.join(ASPECT_RATIOS)}")
        return aspect_ratio

    @field_validator("lora", mode="before")
    @classmethod
    def _absolute_lora(cls, value: object, info: ValidationInfo) -> object:
        if value is None or isinstance(value, Path):
            path = value
        elif isinstance(value, str):
            if not value.strip():
                raise ValueError("is empty: leave the field out for no LoRA")
            path = Path(value).expanduser()
        else:
            raise ValueError("must be a file path in quotes")
        if path is None or path.is_absolute():
            return path
        context = info.context or {}
        base = Path(context.get(CONTEXT_BASE_DIR) or Path.cwd())
        return (base / path).resolve()

    @model_validator(mode="after")
    def _required_languages(self, info: ValidationInfo) -> Self:
        context = info.context or {}
        for language in context.get(CONTEXT_LANGUAGES, ()):
            for field in ("name", "description"):
                if language not in getattr(self, field):
                    raise ValueError(f"{field} needs a {language!r} entry")
        return self

    def name_in(self, language: str) -> str:
        """The name in `language` ("hi", "hi-IN"), or in English when it has none."""
        return _in_language(self.name, language)

    def description_in(self, language: str) -> str:
        return _in_language(self.description, language)

    def render(self, prompt: str) -> str:
        """The full prompt with the user's text in place. The text is inserted as is: braces
        and anything else in it stay literal."""
        return self.prompt.replace(PLACEHOLDER, prompt)

    def fingerprint(self) -> str:
        """A short hash of what shapes this style's images, so a preview made with it can be
        reused until the entry's prompt or settings change (names and descriptions don't
        count)."""
        relevant = {
            "prompt": self.prompt,
            "negative": self.negative,
            "steps": self.steps,
            "guidance": float(self.guidance),
            "aspect_ratio": self.aspect_ratio,
            "lora": str(self.lora) if self.lora is not None else None,
            "lora_scale": float(self.lora_scale),
        }
        encoded = json.dumps(relevant, sort_keys=True, ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(encoded).hexdigest()[:16]


class CatalogueDefaults(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    # The avatar style for a user who names none and has set no default of their own.
    style: str
    # The subject text for avatars when the user adds no words of their own.
    avatar_prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)

    @field_validator("style")
    @classmethod
    def _key_shape(cls, style: str) -> str:
        return _check_key(style)

    @field_validator("avatar_prompt")
    @classmethod
    def _not_blank(cls, avatar_prompt: str) -> str:
        if not avatar_prompt.strip():
            raise ValueError("is blank")
        return avatar_prompt


class StyleCatalogue(BaseModel):
    """The enabled styles, built-ins in file order and then an override's new entries."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    defaults: CatalogueDefaults
    styles: dict[str, Style]

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        for key, style in self.styles.items():
            if key != style.key:
                raise ValueError(f"style {key!r} is filed under another key ({style.key!r})")
            if not style.enabled:
                raise ValueError(f"style {key!r} is disabled: leave it out of the catalogue")
        if self.defaults.style not in self.styles:
            raise ValueError(f"defaults.style {self.defaults.style!r} is not an enabled style")
        return self

    def get(self, key: str) -> Style | None:
        """The style a user means by `key`: "Pencil_Sketch" and "pencil sketch" both find
        "pencil-sketch", and so does its name in any language the buttons show ("मधुबनी").
        None for an unknown or disabled style."""
        wanted = normalise_key(key)
        if (style := self.styles.get(wanted)) is not None:
            return style
        named = (s for s in self.styles.values() if wanted in map(normalise_key, s.name.values()))
        return next(named, None)

    def style_keys(self) -> tuple[str, ...]:
        return tuple(self.styles)

    @property
    def default_style(self) -> Style:
        return self.styles[self.defaults.style]


def catalogue_fingerprint(catalogue: StyleCatalogue, style_key: str) -> str:
    """`Style.fingerprint` of an enabled style; KeyError for one not in the catalogue."""
    style = catalogue.get(style_key)
    if style is None:
        raise KeyError(style_key)
    return style.fingerprint()


# Loading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    path: Path
    defaults: dict[str, Any]
    styles: dict[str, dict[str, Any]]


def _describe(error: ValidationError) -> str:
    """One line for pydantic's errors: "field: problem; field: problem"."""
    parts: list[str] = []
    for detail in error.errors(include_url=False):
        field = ".".join(str(part) for part in detail["loc"])
        kind = detail["type"]
        if kind == "missing":
            problem = "is required"
        elif kind == "extra_forbidden":
            problem = "is not a known field"
        elif kind == "value_error":
            problem = str(detail.get("ctx", {}).get("error", detail["msg"]))
        else:
            problem = detail["msg"]
            value = detail.get("input")
            if isinstance(value, bool | int | float | str):
                shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:39] + "…"
                problem += f", got {shown}"
        parts.append(f"{field}: {problem}" if field else problem)
    return "; ".join(parts)


def _read(path: Path) -> _Source:
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogueError(f"{path}: cannot read the style catalogue: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogueError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"defaults", "styles"})
    if unknown:
        raise CatalogueError(
            f"{path}: unknown top-level key {unknown[0]!r} "
            "(a catalogue has only [defaults] and [styles.<key>] tables)"
        )
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise CatalogueError(f"{path}: defaults must be a table, [defaults]")
    styles = data.get("styles", {})
    if not isinstance(styles, dict):
        raise CatalogueError(f"{path}: styles must be tables, [styles.<key>]")
    for key, entry in styles.items():
        if not isinstance(entry, dict):
            raise CatalogueError(f"{path}: style {key!r}: must be a table, [styles.{key}]")
        if "key" in entry:
            raise CatalogueError(
                f"{path}: style {key!r}: key: is not a known field (the key is the table name)"
            )
    return _Source(path, defaults, styles)


def _style(path: Path, key: str, entry: dict[str, Any], languages: tuple[str, ...]) -> Style:
    context = {CONTEXT_BASE_DIR: path.parent, CONTEXT_LANGUAGES: languages}
    try:
        return Style.model_validate({"key": key, **entry}, context=context)
    except ValidationError as exc:
        raise CatalogueError(f"{path}: style {key!r}: {_describe(exc)}") from None


def _assemble(path: Path, defaults: dict[str, Any], styles: dict[str, Style]) -> StyleCatalogue:
    try:
        checked = CatalogueDefaults.model_validate(defaults)
    except ValidationError as exc:
        raise CatalogueError(f"{path}: defaults: {_describe(exc)}") from None
    chosen = styles.get(checked.style)
    if chosen is None:
        raise CatalogueError(
            f"{path}: defaults: style {checked.style!r} is not in the catalogue "
            f"(known: {', '.join(styles)})"
        )
    if not chosen.enabled:
        raise CatalogueError(f"{path}: defaults: style {checked.style!r} is disabled")
    enabled = {key: style for key, style in styles.items() if style.enabled}
    try:
        return StyleCatalogue(defaults=checked, styles=enabled)
    except ValidationError as exc:  # pragma: no cover - the checks above come first
        raise CatalogueError(f"{path}: {_describe(exc)}") from None


def load_catalogue(override: Path | None = None) -> StyleCatalogue:
    """The built-in catalogue, changed by `override` when given.

    An override entry replaces the built-in entry of the same key whole (it must be complete),
    or adds a new style after the built-ins; an entry with only `enabled` turns a built-in off
    (or back on) as it is. `[defaults]` keys in the override replace the built-in ones.
    Relative LoRA paths are read from the folder of the file that names them. Raises
    CatalogueError for any mistake, naming the file, the style and the field.
    """
    builtin = _read(BUILTIN_CATALOGUE)
    styles = {
        key: _style(builtin.path, key, entry, BUILTIN_LANGUAGES)
        for key, entry in builtin.styles.items()
    }
    catalogue = _assemble(builtin.path, builtin.defaults, styles)
    if override is None:
        return catalogue

    extra = _read(override)
    for key, entry in extra.styles.items():
        if key in styles and set(entry) == {"enabled"}:
            enabled = entry["enabled"]
            if not isinstance(enabled, bool):
                raise CatalogueError(f"{extra.path}: style {key!r}: enabled: must be true or false")
            styles[key] = styles[key].model_copy(update={"enabled": enabled})
        else:
            styles[key] = _style(extra.path, key, entry, (DEFAULT_LANGUAGE,))
    return _assemble(extra.path, {**builtin.defaults, **extra.defaults}, styles)
