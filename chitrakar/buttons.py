"""Buttons under results and in the style catalogue: what they say, what their callback data
means, and who may press them. Plain Python, no I/O; channels draw the buttons.

Callback data is short ASCII (`u:42:1` = upscale image 1 of job 42), because Telegram allows
64 bytes and anyone can send any data: it is parsed strictly and checked against the
database before anything happens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from chitrakar.domain import CommandError, JobKind
from chitrakar.styles import StyleCatalogue
from chitrakar.texts import text

CALLBACK_DATA_LIMIT = 64
# An album has at most four images (the `--n` limit), so indexes are 0..3.
MAX_INDEX = 9
MAX_JOB_ID = 2**63 - 1


class Action(StrEnum):
    AGAIN = "a"  # the same job with new seeds
    VARIATION = "v"  # img2img of image i
    UPSCALE = "u"  # image i at twice the size
    PICK = "p"  # image i as a file, at full size
    STYLE = "s"  # make a style the user's default
    RESEND = "r"  # send a past result again (by Telegram's file id)
    HISTORY = "h"  # a page of the user's history
    FORGET = "f"  # confirm (or not) deleting everything stored about the user
    SETTING = "g"  # a group admin changes one of the group's settings
    REVIEW = "w"  # a bot admin decides on a report


class InvalidButton(ValueError):
    """Callback data this bot did not make (tampered, or from an older version)."""


@dataclass(frozen=True)
class ButtonPress:
    action: Action
    job_id: int | None = None
    index: int | None = None
    style: str | None = None
    # History pages and the forget confirmation belong to one user: only they may press.
    owner: str | None = None
    page: int | None = None
    confirm: bool | None = None
    # A setting ("c:portrait", "s:anime", "p:block", "x:on", "q:20") or a review decision
    # ("dismissed", "deleted", "banned").
    value: str | None = None

    @property
    def data(self) -> str:
        if self.action == Action.STYLE:
            return f"{self.action}:{self.style}"
        if self.action == Action.HISTORY:
            return f"{self.action}:{self.owner}:{self.page}"
        if self.action == Action.FORGET:
            return f"{self.action}:{self.owner}:{'y' if self.confirm else 'n'}"
        if self.action == Action.SETTING:
            return f"{self.action}:{self.value}"
        if self.action == Action.REVIEW:
            return f"{self.action}:{self.job_id}:{_REVIEW_CODES[self.value or '']}"
        if self.index is None:
            return f"{self.action}:{self.job_id}"
        return f"{self.action}:{self.job_id}:{self.index}"


@dataclass(frozen=True)
class Button:
    """A button as the channel shows it: a text key with its parameters, and its press."""

    label_key: str
    press: ButtonPress
    label_params: dict[str, Any] = field(default_factory=dict)


_JOB_PATTERN = re.compile(r"(?P<action>[avupr]):(?P<job>[1-9][0-9]{0,18})(?::(?P<index>[0-9]))?")
_HISTORY_PATTERN = re.compile(r"h:(?P<owner>[1-9][0-9]{0,19}):(?P<page>[1-9][0-9]{0,3})")
_FORGET_PATTERN = re.compile(r"f:(?P<owner>[1-9][0-9]{0,19}):(?P<choice>[yn])")
_SETTING_PATTERN = re.compile(
    # A command or style with the state the press asks for: pressed twice, or by two admins
    # at once, it is set twice, not switched back.
    r"g:(?P<value>c:[a-z]{1,20}:(?:on|off)|s:[a-z0-9][a-z0-9-]{0,40}:(?:on|off)"
    r"|p:(?:block|spoiler|allow|default)"
    r"|x:(?:on|off)|q:(?:off|[1-9][0-9]{0,4}))"
)
# A report's id travels in job_id; the decision as one letter.
_REVIEW_PATTERN = re.compile(r"w:(?P<report>[1-9][0-9]{0,18}):(?P<code>[dxb])")
_REVIEW_CODES = {"dismissed": "d", "deleted": "x", "banned": "b"}
_REVIEW_DECISIONS = {code: decision for decision, code in _REVIEW_CODES.items()}
_STYLE_PATTERN = re.compile(r"s:(?P<style>[a-z0-9][a-z0-9-]{0,40})")
_NEEDS_INDEX = frozenset({Action.VARIATION, Action.UPSCALE, Action.PICK})


def parse_button(data: str | None) -> ButtonPress:
    """The press a callback's data stands for. Raises InvalidButton for anything else."""
    if not data or len(data.encode("utf-8")) > CALLBACK_DATA_LIMIT:
        raise InvalidButton(data)
    if style := _STYLE_PATTERN.fullmatch(data):
        return ButtonPress(Action.STYLE, style=style["style"])
    if history := _HISTORY_PATTERN.fullmatch(data):
        return ButtonPress(Action.HISTORY, owner=history["owner"], page=int(history["page"]))
    if forget := _FORGET_PATTERN.fullmatch(data):
        return ButtonPress(Action.FORGET, owner=forget["owner"], confirm=forget["choice"] == "y")
    if setting := _SETTING_PATTERN.fullmatch(data):
        return ButtonPress(Action.SETTING, value=setting["value"])
    if review := _REVIEW_PATTERN.fullmatch(data):
        return ButtonPress(
            Action.REVIEW, job_id=int(review["report"]), value=_REVIEW_DECISIONS[review["code"]]
        )
    match = _JOB_PATTERN.fullmatch(data)
    if match is None:
        raise InvalidButton(data)
    action = Action(match["action"])
    job_id = int(match["job"])
    index = int(match["index"]) if match["index"] is not None else None
    if job_id > MAX_JOB_ID or (action in _NEEDS_INDEX) != (index is not None):
        raise InvalidButton(data)
    return ButtonPress(action, job_id=job_id, index=index)


def result_buttons(
    job_id: int, kind: JobKind, count: int, selfie_kept: bool = True
) -> list[list[Button]]:
    """Rows of buttons under a result, Midjourney-style: upscale or vary one image, make
    the set again, and for avatars and upscales take an image as a file. An avatar set can
    be made again only while its selfie is kept."""
    numbered = count > 1

    def row(action: Action, key: str, numbered_key: str) -> list[Button]:
        return [
            Button(
                numbered_key if numbered else key,
                ButtonPress(action, job_id=job_id, index=i),
                {"number": i + 1},
            )
            for i in range(count)
        ]

    rows: list[list[Button]] = []
    if kind in (JobKind.PORTRAIT, JobKind.AVATAR, JobKind.VARIATION):
        rows.append(row(Action.UPSCALE, "button.upscale", "button.upscale_n"))
        rows.append(row(Action.VARIATION, "button.variation", "button.variation_n"))
    if kind in (JobKind.AVATAR, JobKind.UPSCALE):
        rows.append(row(Action.PICK, "button.pick", "button.pick_n"))
    if kind != JobKind.UPSCALE and (kind != JobKind.AVATAR or selfie_kept):
        rows.append([Button("button.again", ButtonPress(Action.AGAIN, job_id=job_id))])
    return rows


def offered_actions(kind: JobKind, count: int) -> frozenset[Action]:
    """What the buttons under a result of this kind let a user do."""
    if kind == JobKind.PREVIEWS:
        return frozenset()
    return frozenset(b.press.action for row in result_buttons(0, kind, count) for b in row)


def history_buttons(
    owner: str, entries: list[tuple[int, bool]], page: int, pages: int
) -> list[list[Button]]:
    """Under a page of history: send each result again, or (where it can be: see
    `repeatable`) make it again with new seeds; then the pages before and after. `entries`
    are (job id, repeatable) pairs."""
    rows = [
        [Button("button.resend", ButtonPress(Action.RESEND, job_id=job_id), {"number": n})]
        + (
            [Button("button.repeat", ButtonPress(Action.AGAIN, job_id=job_id), {"number": n})]
            if can_repeat
            else []
        )
        for n, (job_id, can_repeat) in enumerate(entries, start=1)
    ]
    turns = []
    if page > 1:
        turns.append(
            Button("button.previous", ButtonPress(Action.HISTORY, owner=owner, page=page - 1))
        )
    if page < pages:
        turns.append(Button("button.next", ButtonPress(Action.HISTORY, owner=owner, page=page + 1)))
    return [*rows, turns] if turns else rows


def repeatable(kind: JobKind, count: int, selfie_kept: bool) -> bool:
    """Whether a result can be made again: its kind offers it, and an avatar's selfie is
    still there to start from."""
    return Action.AGAIN in offered_actions(kind, count) and (kind != JobKind.AVATAR or selfie_kept)


def forget_buttons(owner: str) -> list[list[Button]]:
    return [
        [
            Button("button.forget_yes", ButtonPress(Action.FORGET, owner=owner, confirm=True)),
            Button("button.forget_no", ButtonPress(Action.FORGET, owner=owner, confirm=False)),
        ]
    ]


def style_buttons(catalogue: StyleCatalogue, language: str, per_row: int = 2) -> list[list[Button]]:
    """One button per style, by its name in the user's language."""
    presses = [
        Button(
            "button.style",
            ButtonPress(Action.STYLE, style=style.key),
            {"name": style.name_in(language)},
        )
        for style in catalogue.styles.values()
    ]
    return [presses[i : i + per_row] for i in range(0, len(presses), per_row)]


def labelled(language: str, rows: list[list[Button]]) -> list[list[tuple[str, str]]]:
    """(text, callback data) of each button, for a channel to draw."""
    return [
        [(text(language, b.label_key, **b.label_params), b.press.data) for b in row] for row in rows
    ]


def stored_rows(language: str, rows: list[list[Button]]) -> list[list[list[str]]]:
    """The same, as plain lists: what a channel that keeps its messages as JSON stores."""
    return [[[label, data] for label, data in row] for row in labelled(language, rows)]


def may_press(*, presser: str, requester: str, in_group: bool, presser_is_admin: bool) -> bool:
    """Result buttons belong to who asked; in a group, the chat's admins may press them too."""
    return presser == requester or (in_group and presser_is_admin)


class ButtonRefused(CommandError):
    """A press that is understood but cannot be done (stale, not yours): the key says why."""


# How far variations and upscales move from the image they start from.
VARIATION_STRENGTH = 0.55
UPSCALE_STRENGTH = 0.3
UPSCALE_FACTOR = 2
# An upscale of an upscale would exceed what a chat shows and what a GPU tiles quickly.
MAX_UPSCALED_SIDE = 4096


def review_buttons(report_id: int) -> list[list[Button]]:
    """Under a report's card, for the bot's admins."""

    def press(decision: str) -> ButtonPress:
        return ButtonPress(Action.REVIEW, job_id=report_id, value=decision)

    return [
        [
            Button("button.review_dismiss", press("dismissed")),
            Button("button.review_delete", press("deleted")),
        ],
        [Button("button.review_ban", press("banned"))],
    ]
