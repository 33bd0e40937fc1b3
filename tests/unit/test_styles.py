"""The style catalogue: the built-in entries are complete and written with care, an operator's
override replaces, adds and hides entries, and every mistake stops start-up with one clear line
naming the file, the style and the field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from chitrakar.domain import ASPECT_RATIOS
from chitrakar.styles import (
    BUILTIN_CATALOGUE,
    CatalogueError,
    Style,
    StyleCatalogue,
    catalogue_fingerprint,
    load_catalogue,
)

REQUIRED_KEYS = (
    "cinematic-portrait",
    "bollywood-poster",
    "madhubani",
    "warli",
    "tanjore",
    "rajasthani-miniature",
    "kathakali",
    "anime",
    "3d-animated",
    "watercolour",
    "pencil-sketch",
    "professional-headshot",
)
BANNED_WORDS = (
    "exotic",
    "savage",
    "primitive",
    "fair skin",
    "fairness",
    "whiten",
    "lighter skin",
)
DEVANAGARI = re.compile(r"[\u0900-\u097F]")

# A complete entry, for override files.
ENTRY = """
name = {{ en = "{name}" }}
description = {{ en = "{description}" }}
prompt = "{prompt}"
negative = "text, watermark"
steps = 20
guidance = 6.5
aspect_ratio = "1:1"
strength = 0.6
"""


def entry(
    name: str = "Test style",
    description: str = "A style for tests",
    prompt: str = "test painting of {prompt}, bold colours",
) -> str:
    return ENTRY.format(name=name, description=description, prompt=prompt)


def write(folder: Path, text: str, name: str = "override.toml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def builtin() -> StyleCatalogue:
    return load_catalogue()


# The built-in catalogue ----------------------------------------------------------------------


def test_the_builtin_catalogue_loads_with_every_required_style(builtin: StyleCatalogue) -> None:
    assert set(REQUIRED_KEYS) <= set(builtin.style_keys())
    assert len(builtin.style_keys()) >= 14
    assert all(style.enabled for style in builtin.styles.values())
    assert builtin.default_style.key == "cinematic-portrait"
    assert builtin.defaults.avatar_prompt.strip()


def test_every_builtin_entry_keeps_to_the_schema(builtin: StyleCatalogue) -> None:
    for key, style in builtin.styles.items():
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", key), key
        assert style.key == key
        assert style.prompt.count("{prompt}") == 1, key
        assert style.aspect_ratio in ASPECT_RATIOS, key
        assert 1 <= style.steps <= 50, key
        assert 0 <= style.guidance <= 30, key
        assert 0.05 <= style.strength <= 1.0, key
        assert style.lora is None, f"{key}: built-ins name no LoRA"


def test_every_builtin_is_named_and_described_in_english_and_hindi(
    builtin: StyleCatalogue,
) -> None:
    for key, style in builtin.styles.items():
        for texts in (style.name, style.description):
            assert texts["en"].strip(), key
            assert DEVANAGARI.search(texts["hi"]), f"{key}: Hindi text is not in Devanagari"
        assert style.name_in("hi") == style.name["hi"]
        assert style.name_in("hi-IN") == style.name["hi"]
        assert style.name_in("ta") == style.name["en"]
        assert style.description_in("hi") == style.description["hi"]
        assert style.description_in("en") == style.description["en"]


def test_every_prompt_renders_user_text_with_braces_intact(builtin: StyleCatalogue) -> None:
    user_text = "a woman in a {x} saree, {prompt} and {0} {{"
    for key, style in builtin.styles.items():
        rendered = style.render(user_text)
        before, after = style.prompt.split("{prompt}")
        assert rendered == before + user_text + after, key


def test_no_prompt_uses_exoticising_or_skin_lightening_words(builtin: StyleCatalogue) -> None:
    for key, style in builtin.styles.items():
        lowered = style.prompt.lower()
        for word in BANNED_WORDS:
            assert word not in lowered, f"{key}: {word!r} in the prompt"


def test_negative_prompts_keep_text_and_defects_out(builtin: StyleCatalogue) -> None:
    for key, style in builtin.styles.items():
        terms = {term.strip() for term in style.negative.lower().split(",")}
        assert {"text", "watermark", "caricature", "skin whitening"} <= terms, key


def test_style_text_leaves_room_for_the_users_words(builtin: StyleCatalogue) -> None:
    # SD 1.5 reads about 75 CLIP tokens. Counting words and commas undercounts the tokens of
    # rare words such as "kireedam", so the bound leaves a margin for them and the subject.
    for key, style in builtin.styles.items():
        for text in (style.prompt.replace("{prompt}", ""), style.negative):
            assert len(text.replace(",", " , ").split()) <= 48, key


@pytest.mark.parametrize(
    ("written", "key"),
    [("Madhubani", "madhubani"), ("मधुबनी", "madhubani"), ("bollywood_poster", "bollywood-poster")],
)
def test_a_style_is_found_by_its_key_or_by_the_name_its_button_shows(
    builtin: StyleCatalogue, written: str, key: str
) -> None:
    style = builtin.get(written)
    assert style is not None and style.key == key
    assert builtin.get("nonesuch") is None


# Overrides ---------------------------------------------------------------------------------


def test_an_override_replaces_a_builtin_entry_whole_in_its_place(
    builtin: StyleCatalogue, tmp_path: Path
) -> None:
    override = write(tmp_path, "[styles.anime]" + entry(name="My anime"))
    catalogue = load_catalogue(override)
    anime = catalogue.get("anime")
    assert anime is not None
    assert anime.name_in("en") == "My anime"
    assert anime.name_in("hi") == "My anime"  # no Hindi name: English stands in
    assert anime.steps == 20
    assert anime.negative == "text, watermark"
    assert catalogue.style_keys() == builtin.style_keys()


def test_an_override_adds_a_style_with_a_lora_beside_the_override_file(
    builtin: StyleCatalogue, tmp_path: Path
) -> None:
    folder = tmp_path / "operator"
    override = write(
        folder,
        "[styles.my-brand]"
        + entry(name="My brand")
        + 'lora = "loras/brand.safetensors"\nlora_scale = 0.8\n'
        + "[styles.other]"
        + entry()
        + f"lora = {str(tmp_path / 'abs.safetensors')!r}\n",
    )
    catalogue = load_catalogue(override)
    assert catalogue.style_keys() == (*builtin.style_keys(), "my-brand", "other")
    brand = catalogue.get("my-brand")
    assert brand is not None
    assert brand.lora == (folder / "loras" / "brand.safetensors").resolve()
    assert brand.lora.is_absolute()
    assert brand.lora_scale == 0.8
    other = catalogue.get("other")
    assert other is not None
    assert other.lora == tmp_path / "abs.safetensors"
    assert other.lora_scale == 1.0


def test_an_override_hides_builtins(builtin: StyleCatalogue, tmp_path: Path) -> None:
    override = write(
        tmp_path,
        "[styles.warli]\nenabled = false\n"
        + "[styles.anime]"
        + entry()
        + "enabled = false\n"
        + "[styles.extra]"
        + entry()
        + "enabled = false\n",
    )
    catalogue = load_catalogue(override)
    assert catalogue.get("warli") is None
    assert catalogue.get("anime") is None
    assert catalogue.get("extra") is None
    assert catalogue.style_keys() == tuple(k for k in builtin.styles if k not in {"warli", "anime"})


def test_an_override_changes_defaults_key_by_key(builtin: StyleCatalogue, tmp_path: Path) -> None:
    override = write(tmp_path, '[defaults]\nstyle = "watercolour"\n')
    catalogue = load_catalogue(override)
    assert catalogue.default_style.key == "watercolour"
    assert catalogue.defaults.avatar_prompt == builtin.defaults.avatar_prompt


def test_the_default_style_can_be_disabled_if_another_is_named(tmp_path: Path) -> None:
    override = write(
        tmp_path,
        '[defaults]\nstyle = "anime"\n[styles.cinematic-portrait]\nenabled = false\n',
    )
    catalogue = load_catalogue(override)
    assert catalogue.default_style.key == "anime"
    assert catalogue.get("cinematic-portrait") is None


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("[styles.foo]" + entry(prompt="painting, bold"), ["'foo'", "prompt", "{prompt}"]),
        ("[styles.foo]" + entry(prompt="{prompt} and {prompt}"), ["'foo'", "prompt", "once"]),
        ("[styles.foo]" + entry(prompt="{prompt} in {style}"), ["'foo'", "prompt", "{style}"]),
        ("[styles.foo]" + entry(prompt="{prompt} in {"), ["'foo'", "prompt", "brace"]),
        (
            "[styles.foo]" + entry().replace('"1:1"', '"7:5"'),
            ["'foo'", "aspect_ratio", "7:5"],
        ),
        ("[styles.foo]" + entry().replace("steps = 20", "steps = 0"), ["'foo'", "steps"]),
        ("[styles.foo]" + entry().replace("steps = 20", "steps = 51"), ["'foo'", "steps"]),
        ("[styles.foo]" + entry().replace("steps = 20", 'steps = "20"'), ["'foo'", "steps"]),
        ("[styles.foo]" + entry().replace("steps = 20", ""), ["'foo'", "steps", "required"]),
        ("[styles.foo]" + entry().replace("= 6.5", "= 31"), ["'foo'", "guidance"]),
        ("[styles.foo]" + entry().replace("= 0.6", "= 1.5"), ["'foo'", "strength"]),
        ("[styles.foo]" + entry() + "lora_scale = 3\n", ["'foo'", "lora_scale"]),
        ("[styles.foo]" + entry() + 'lora = ""\n', ["'foo'", "lora"]),
        ("[styles.foo]" + entry() + 'colour = "red"\n', ["'foo'", "colour", "not a known field"]),
        ("[styles.foo]" + entry() + 'key = "bar"\n', ["'foo'", "key"]),
        ("[styles.foo]" + entry() + 'enabled = "no"\n', ["'foo'", "enabled"]),
        ("[styles.foo]" + entry().replace("en =", "fr ="), ["'foo'", "name", "'en'"]),
        ("[styles.foo]" + entry(description="two\\nlines"), ["'foo'", "description", "one line"]),
        ("[styles.Foo_Bar]" + entry(), ["'Foo_Bar'", "key", "lowercase"]),
        ("[styles.warli]\nenabled = 0\n", ["'warli'", "enabled"]),
        ('[defaults]\nstyle = "nope"\n', ["'nope'", "defaults", "not in the catalogue"]),
        (
            '[defaults]\nstyle = "anime"\n[styles.anime]\nenabled = false\n',
            ["'anime'", "defaults", "disabled"],
        ),
        (
            "[styles.cinematic-portrait]\nenabled = false\n",
            ["'cinematic-portrait'", "defaults", "disabled"],
        ),
        ('[defaults]\navatar_prompt = " "\n', ["defaults: avatar_prompt"]),
        ('[defaults]\nlanguage = "hi"\n', ["defaults: language: is not a known field"]),
        ("[style.foo]" + entry(), ["unknown", "'style'"]),
        ('styles = "foo"\n', ["styles", "table"]),
    ],
)
def test_a_mistake_in_an_override_names_the_file_the_style_and_the_field(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    override = write(tmp_path, text)
    with pytest.raises(CatalogueError) as caught:
        load_catalogue(override)
    message = str(caught.value)
    assert message.startswith(f"{override}: ")
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message


def test_a_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    override = write(tmp_path, '[styles.foo]\nprompt = "unterminated\n')
    with pytest.raises(CatalogueError, match="not valid TOML") as caught:
        load_catalogue(override)
    assert str(caught.value).startswith(f"{override}: ")
    assert "\n" not in str(caught.value)


def test_a_missing_override_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    with pytest.raises(CatalogueError, match="cannot read") as caught:
        load_catalogue(missing)
    assert str(missing) in str(caught.value)


def test_the_error_message_for_the_example_reads_plainly(tmp_path: Path) -> None:
    override = write(tmp_path, "[styles.foo]" + entry(prompt="painting"), name="styles.toml")
    with pytest.raises(CatalogueError) as caught:
        load_catalogue(override)
    assert str(caught.value) == (
        f"{override}: style 'foo': prompt: must contain {{prompt}} exactly once (found 0)"
    )


def test_the_builtin_catalogue_file_is_the_package_data_file() -> None:
    assert BUILTIN_CATALOGUE.name == "styles.toml"
    assert BUILTIN_CATALOGUE.parent.name == "chitrakar"


# Lookup and fingerprints -------------------------------------------------------------------


@pytest.mark.parametrize(
    "written",
    ["pencil-sketch", "Pencil_Sketch", "pencil sketch", "PENCIL-SKETCH", "  pencil  _sketch "],
)
def test_lookup_forgives_case_spaces_and_underscores(builtin: StyleCatalogue, written: str) -> None:
    style = builtin.get(written)
    assert style is not None
    assert style.key == "pencil-sketch"


@pytest.mark.parametrize("written", ["", "-", "nope", "pencil", "pencilsketch"])
def test_lookup_of_an_unknown_style_is_none(builtin: StyleCatalogue, written: str) -> None:
    assert builtin.get(written) is None


def test_3d_animated_is_found_as_typed(builtin: StyleCatalogue) -> None:
    style = builtin.get("3D Animated")
    assert style is not None
    assert style.key == "3d-animated"


def test_the_fingerprint_follows_generation_fields_only(
    builtin: StyleCatalogue, tmp_path: Path
) -> None:
    base = catalogue_fingerprint(builtin, "anime")
    assert re.fullmatch(r"[0-9a-f]{16}", base)
    assert catalogue_fingerprint(load_catalogue(), "Anime") == base

    anime = builtin.styles["anime"]
    reworded = anime.model_copy(
        update={"name": {"en": "Other"}, "description": {"en": "Other words"}, "strength": 0.9}
    )
    assert reworded.fingerprint() == base
    for change in (
        {"prompt": anime.prompt + ", golden hour"},
        {"negative": anime.negative + ", hat"},
        {"steps": anime.steps + 1},
        {"guidance": anime.guidance + 0.5},
        {"aspect_ratio": "1:1"},
        {"lora": tmp_path / "a.safetensors"},
        {"lora_scale": 0.5},
    ):
        assert anime.model_copy(update=change).fingerprint() != base, change

    # Through an override file, as an operator would change it.
    anime_toml = "[styles.anime]" + entry(description="first")
    first = load_catalogue(write(tmp_path, anime_toml, "a.toml"))
    second = load_catalogue(write(tmp_path, anime_toml.replace("first", "second"), "b.toml"))
    third = load_catalogue(write(tmp_path, anime_toml.replace("bold", "soft"), "c.toml"))
    fingerprints = [catalogue_fingerprint(c, "anime") for c in (first, second, third)]
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]


def test_the_fingerprint_of_an_unknown_style_is_a_key_error(builtin: StyleCatalogue) -> None:
    with pytest.raises(KeyError):
        catalogue_fingerprint(builtin, "nope")


def test_a_style_can_be_built_directly_and_is_frozen(tmp_path: Path) -> None:
    style = Style.model_validate(
        {
            "key": "plain",
            "name": {"en": "Plain"},
            "description": {"en": "Nothing added"},
            "prompt": "{prompt}",
            "steps": 10,
            "guidance": 5,
            "aspect_ratio": "1:1",
            "strength": 1,
            "lora": "weights.safetensors",
        },
        context={"base_dir": tmp_path},
    )
    assert style.render("a cat") == "a cat"
    assert style.lora == (tmp_path / "weights.safetensors").resolve()
    assert style.guidance == 5.0
    with pytest.raises(ValueError):
        style.steps = 20  # type: ignore[misc]


def test_a_catalogue_must_hold_its_default_style(builtin: StyleCatalogue) -> None:
    with pytest.raises(ValueError, match=r"defaults\.style"):
        StyleCatalogue(
            defaults=builtin.defaults,
            styles={"anime": builtin.styles["anime"]},
        )


def test_a_builtin_style_needs_every_builtin_language() -> None:
    data = {
        "key": "plain",
        "name": {"en": "Plain", "hi": "सादा"},
        "description": {"en": "Nothing added"},
        "prompt": "{prompt}",
        "steps": 10,
        "guidance": 5.0,
        "aspect_ratio": "1:1",
        "strength": 0.5,
    }
    Style.model_validate(data)
    with pytest.raises(ValueError, match="description needs a 'hi' entry"):
        Style.model_validate(data, context={"languages": ("en", "hi")})
