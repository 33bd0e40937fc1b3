"""Callback data: what the bot makes parses back to the same press, and nothing else parses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chitrakar.buttons import (
    CALLBACK_DATA_LIMIT,
    Action,
    ButtonPress,
    InvalidButton,
    labelled,
    may_press,
    parse_button,
    result_buttons,
    style_buttons,
)
from chitrakar.domain import JobKind
from chitrakar.styles import load_catalogue
from chitrakar.texts import LANGUAGES


@pytest.mark.parametrize("kind", list(JobKind))
@pytest.mark.parametrize("count", [1, 2, 4])
def test_every_result_button_round_trips_and_fits(kind: JobKind, count: int) -> None:
    for row in result_buttons(2**62, kind, count):
        for button in row:
            data = button.press.data
            assert len(data.encode()) <= CALLBACK_DATA_LIMIT
            assert parse_button(data) == button.press


def test_an_avatar_album_has_pick_and_an_upscale_has_no_again() -> None:
    avatar = {b.press.action for row in result_buttons(1, JobKind.AVATAR, 4) for b in row}
    assert avatar == {Action.UPSCALE, Action.VARIATION, Action.PICK, Action.AGAIN}
    portrait = {b.press.action for row in result_buttons(1, JobKind.PORTRAIT, 1) for b in row}
    assert Action.PICK not in portrait
    upscale = {b.press.action for row in result_buttons(1, JobKind.UPSCALE, 1) for b in row}
    assert upscale == {Action.PICK}


@pytest.mark.parametrize("language", LANGUAGES)
def test_style_buttons_round_trip_with_names_in_the_language(language: str) -> None:
    catalogue = load_catalogue()
    rows = labelled(language, style_buttons(catalogue, language))
    pressed = [parse_button(data).style for row in rows for _, data in row]
    assert pressed == list(catalogue.style_keys())
    assert all(label for row in rows for label, _ in row)


@pytest.mark.parametrize(
    "data",
    [
        None,
        "",
        "u:1",  # upscale needs an image
        "a:1:0",  # again takes none
        "u:0:1",  # no job 0
        "u:01:1",
        "u:-1:1",
        "u:99999999999999999999:1",
        "x:1:1",
        "u:1:1:1",
        "s:",
        "s:Has Spaces",
        "s:" + "a" * 70,
        "u:1:1\n",
    ],
)
def test_data_the_bot_did_not_make_is_invalid(data: str | None) -> None:
    with pytest.raises(InvalidButton):
        parse_button(data)


@given(st.text(max_size=80))
def test_any_data_parses_or_is_invalid_and_never_crashes(data: str) -> None:
    try:
        press = parse_button(data)
    except InvalidButton:
        return
    assert isinstance(press, ButtonPress) and press.data == data


def test_who_may_press() -> None:
    assert may_press(presser="1", requester="1", in_group=True, presser_is_admin=False)
    assert not may_press(presser="2", requester="1", in_group=True, presser_is_admin=False)
    assert may_press(presser="2", requester="1", in_group=True, presser_is_admin=True)
    # "Admin" means nothing in a private chat.
    assert not may_press(presser="2", requester="1", in_group=False, presser_is_admin=True)
