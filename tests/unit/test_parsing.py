"""Parsing `/portrait` arguments: options anywhere, mentions, Hindi and mixed-script prompts."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from telegram import Chat, Message, MessageEntity

from bot.handlers import command_arguments
from chitrakar.domain import (
    MAX_PROMPT_CHARS,
    SHOWN_VALUE_CHARS,
    Command,
    CommandError,
    GenerationOptions,
    ImageRequest,
    parse_image_command,
)
from chitrakar.texts import LANGUAGES, text


def parse(args: str) -> tuple[str, GenerationOptions]:
    request = parse_image_command(Command.PORTRAIT, args)
    return request.prompt, request.options


def test_a_plain_prompt_takes_the_defaults() -> None:
    assert parse("a tea stall at dusk") == ("a tea stall at dusk", GenerationOptions())


def test_options_anywhere_and_in_both_forms() -> None:
    prompt, options = parse("--ar 16:9 a kite --seed=42 festival --steps 30 --n 4")
    assert prompt == "a kite festival"
    assert options == GenerationOptions(aspect_ratio="16:9", seed=42, steps=30, images=4)


def test_option_names_ignore_case_and_phone_dashes() -> None:
    # iOS and Android keyboards turn "--" into an em or en dash.
    assert parse("a fort —AR 9:16 –seed 3")[1] == GenerationOptions(aspect_ratio="9:16", seed=3)


@pytest.mark.parametrize(
    "prompt",
    [
        "केरल साड़ी में दादी का सिनेमाई पोर्ट्रेट",
        "ek chai ki dukaan, shaam ka samay, warm light",
        "दादी in a Kerala saree, golden hour",
        "தஞ்சாவூர் ஓவியம் of a dancer",
        "a hyphen-ated word and 42 and — alone",
    ],
)
def test_hindi_hinglish_and_mixed_script_prompts_survive(prompt: str) -> None:
    assert parse(f"{prompt} --seed 1") == (prompt, GenerationOptions(seed=1))


def test_whitespace_and_newlines_collapse() -> None:
    assert parse("  a\nlighthouse\t at  night ")[0] == "a lighthouse at night"


@pytest.mark.parametrize(
    ("args", "key", "params"),
    [
        ("", "error.prompt_missing", {}),
        ("--seed 3", "error.prompt_missing", {}),
        ("x" * (MAX_PROMPT_CHARS + 1), "error.prompt_too_long", {"length": 1001}),
        ("a fort --ar 7:3", "error.option_choice", {"option": "--ar", "value": "7:3"}),
        ("a fort --steps 0", "error.option_range", {"low": 1, "high": 50}),
        ("a fort --steps 51", "error.option_range", {"value": "51"}),
        ("a fort --n 5", "error.option_range", {"option": "--n"}),
        ("a fort --seed -1", "error.option_range", {"option": "--seed"}),
        ("a fort --seed 4294967296", "error.option_range", {"high": 2**32 - 1}),
        ("a fort --seed 1.5", "error.option_not_number", {"value": "1.5"}),
        ("a fort --sty anime", "error.unknown_option", {"option": "--sty"}),
        ("a fort --seed", "error.option_missing_value", {"option": "--seed"}),
        ("a fort --ar=", "error.option_missing_value", {"option": "--ar"}),
        ("a fort --n 1 --n 2", "error.option_repeated", {"option": "--n"}),
    ],
)
def test_bad_input_names_the_problem(args: str, key: str, params: dict[str, object]) -> None:
    with pytest.raises(CommandError) as raised:
        parse(args)
    assert raised.value.key == key
    assert params.items() <= raised.value.params.items()


@pytest.mark.parametrize(
    ("args", "huge"),
    [("a --ar " + "9" * 5000, "9" * 5000), ("a --" + "x" * 5000, "--" + "x" * 5000)],
)
def test_a_huge_value_is_shortened_in_the_explanation(args: str, huge: str) -> None:
    with pytest.raises(CommandError) as raised:
        parse(args)
    shown = [v for v in raised.value.params.values() if isinstance(v, str) and v[:5] == huge[:5]]
    assert shown and all(len(v) <= SHOWN_VALUE_CHARS and v.endswith("…") for v in shown)


def test_a_prompt_at_the_limit_is_accepted() -> None:
    assert len(parse("y" * MAX_PROMPT_CHARS)[0]) == MAX_PROMPT_CHARS


@given(st.text(max_size=300))
def test_any_text_parses_or_names_a_known_problem(args: str) -> None:
    try:
        prompt, options = parse(args)
    except CommandError as exc:
        for language in LANGUAGES:
            explanation = text(language, exc.key, **exc.params)
            assert explanation and len(explanation) < 500
    else:
        assert prompt and len(prompt) <= MAX_PROMPT_CHARS
        assert options.images is None or 1 <= options.images <= 4


def message(text: str, command_length: int) -> Message:
    return Message(
        message_id=1,
        date=datetime.now(UTC),
        chat=Chat(-100, Chat.SUPERGROUP),
        text=text,
        entities=[MessageEntity(MessageEntity.BOT_COMMAND, 0, command_length)],
    )


@pytest.mark.parametrize(
    ("text", "command", "expected"),
    [
        ("/portrait a tea stall", "/portrait", "a tea stall"),
        (
            "/portrait@chitrakar_bot a tea stall --n 2",
            "/portrait@chitrakar_bot",
            "a tea stall --n 2",
        ),
        ("/portrait@chitrakar_bot", "/portrait@chitrakar_bot", ""),
        ("/portrait 🎨 रंगोली  --ar 1:1", "/portrait", "🎨 रंगोली  --ar 1:1"),
    ],
)
def test_arguments_after_the_command_and_mention(text: str, command: str, expected: str) -> None:
    assert command_arguments(message(text, len(command))) == expected


def test_style_and_negative_words_up_to_the_next_option() -> None:
    prompt, options = parse("a fort at dawn --style Warli --no text, watermark —seed 4")
    assert prompt == "a fort at dawn"
    assert options == GenerationOptions(style="warli", negative="text, watermark", seed=4)
    assert parse("a fort --no=blur --n 2")[1] == GenerationOptions(negative="blur", images=2)


def test_a_negative_prompt_has_a_limit() -> None:
    with pytest.raises(CommandError) as raised:
        parse("a fort --no " + "x " * 200)
    assert raised.value.key == "error.negative_too_long"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ("", ImageRequest(Command.AVATAR, "", GenerationOptions())),
        ("watercolour", ImageRequest(Command.AVATAR, "", GenerationOptions(style="watercolour"))),
        (
            "Madhubani smiling, with jasmine in her hair --n 2",
            ImageRequest(
                Command.AVATAR,
                "smiling, with jasmine in her hair",
                GenerationOptions(style="madhubani", images=2),
            ),
        ),
        ("--seed 3", ImageRequest(Command.AVATAR, "", GenerationOptions(seed=3))),
        # Options may come first: the style is still the prompt's first word.
        (
            "--n 2 watercolour at the beach",
            ImageRequest(
                Command.AVATAR, "at the beach", GenerationOptions(style="watercolour", images=2)
            ),
        ),
        # Named with --style, the prompt's first word is only a word.
        (
            "anime girl --style warli",
            ImageRequest(Command.AVATAR, "anime girl", GenerationOptions(style="warli")),
        ),
    ],
)
def test_avatar_takes_the_style_first_and_needs_no_prompt(
    args: str, expected: ImageRequest
) -> None:
    assert parse_image_command(Command.AVATAR, args) == expected


def test_avatar_style_named_twice_is_refused() -> None:
    with pytest.raises(CommandError) as raised:
        parse_image_command(Command.AVATAR, "--style anime --style warli")
    assert raised.value.key == "error.option_repeated"


@pytest.mark.parametrize("written", ["16:9", "16x9", "16×9", "16/9", "16∶9", "१६:९", "１６:９"])
def test_an_aspect_ratio_is_read_as_phones_write_it(written: str) -> None:
    assert parse(f"a fort --ar {written}")[1].aspect_ratio == "16:9"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("/portrait a cat", ("portrait", "a cat")),
        ("  /Portrait@chitrakar_bot   a cat  ", ("portrait", "a cat")),
        ("/quota", ("quota", "")),
        ("/portrait\na cat on\ntwo lines", ("portrait", "a cat on\ntwo lines")),
        ("hello /portrait", (None, "hello /portrait")),
        ("", (None, "")),
    ],
)
def test_a_web_chat_line_splits_into_command_and_arguments(
    line: str, expected: tuple[str | None, str]
) -> None:
    from bot.web.chat import split_command

    assert split_command(line) == expected
