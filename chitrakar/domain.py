"""Domain rules: what a chat command means and how a job moves. Plain Python, no I/O."""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Command(StrEnum):
    START = "start"
    HELP = "help"
    PORTRAIT = "portrait"
    AVATAR = "avatar"
    STYLES = "styles"
    QUOTA = "quota"
    CANCEL = "cancel"
    HISTORY = "history"
    PRIVACY = "privacy"
    EXPORT = "export"
    FORGET = "forget"
    REPORT = "report"
    SETTINGS = "settings"
    # Bot admins' commands (not in the menu).
    BAN = "ban"
    UNBAN = "unban"
    GRANT = "grant"
    SET_QUOTA = "setquota"
    STATS = "stats"
    QUEUE = "queue"
    PAUSE = "pause"
    RESUME = "resume"
    AUDIT = "audit"
    GROUP_QUOTA = "groupquota"


# The command menu, in the order users see it (Telegram's menu, the web chat's chips).
MENU = (
    Command.PORTRAIT,
    Command.AVATAR,
    Command.STYLES,
    Command.QUOTA,
    Command.CANCEL,
    Command.HISTORY,
    Command.PRIVACY,
    Command.EXPORT,
    Command.FORGET,
    Command.HELP,
    Command.START,
)


class JobKind(StrEnum):
    """What a job makes. A command or a button press creates one."""

    PORTRAIT = "portrait"  # text to image
    AVATAR = "avatar"  # a selfie to stylised portraits
    VARIATION = "variation"  # img2img of an earlier result
    UPSCALE = "upscale"  # an earlier result at twice the size
    PREVIEWS = "previews"  # the style catalogue's preview grid


MAX_PROMPT_CHARS = 1000
MAX_NEGATIVE_CHARS = 300
# `--style none` asks for no style even where the user has a default.
NO_STYLE = "none"
STEPS_RANGE = (1, 50)
IMAGES_RANGE = (1, 4)
SEED_RANGE = (0, 2**32 - 1)
# width:height; an image keeps about the area of a square of the model's native side.
ASPECT_RATIOS: Mapping[str, tuple[int, int]] = {
    "1:1": (1, 1),
    "4:5": (4, 5),
    "5:4": (5, 4),
    "3:4": (3, 4),
    "4:3": (4, 3),
    "2:3": (2, 3),
    "3:2": (3, 2),
    "9:16": (9, 16),
    "16:9": (16, 9),
}
# Diffusion models work in latents 8 times smaller than the image.
SIZE_MULTIPLE = 8


# How much of a user's own text an error message repeats back (Telegram caps a message at 4096).
SHOWN_VALUE_CHARS = 40


def _shown(value: str) -> str:
    return value if len(value) <= SHOWN_VALUE_CHARS else value[: SHOWN_VALUE_CHARS - 1] + "…"


class CommandError(ValueError):
    """Bad input from a user. Carries a text key and its parameters, not a sentence,
    so the channel can answer in the user's language."""

    def __init__(self, key: str, **params: Any) -> None:
        super().__init__(key)
        self.key = key
        self.params = params


@dataclass(frozen=True)
class GenerationOptions:
    """What the user set; None where the style or the deployment decides."""

    aspect_ratio: str | None = None
    seed: int | None = None
    steps: int | None = None
    images: int | None = None
    style: str | None = None
    negative: str | None = None


@dataclass(frozen=True)
class ImageRequest:
    """A parsed `/portrait` or `/avatar`: what the user asked for, before any defaults are
    applied. An avatar's prompt may be empty (the style's subject text is used)."""

    command: Command
    prompt: str
    options: GenerationOptions = field(default_factory=GenerationOptions)


def _int_in(option: str, value: str, bounds: tuple[int, int]) -> int:
    low, high = bounds
    try:
        number = int(value)
    except ValueError:
        raise CommandError("error.option_not_number", option=option, value=_shown(value)) from None
    if not low <= number <= high:
        raise CommandError(
            "error.option_range", option=option, value=_shown(value), low=low, high=high
        )
    return number


# How phones write a ratio: "16x9", "16×9", "16/9", the ratio sign "16∶9", other digits.
_RATIO_SIGNS = str.maketrans({"x": ":", "X": ":", "×": ":", "/": ":", "∶": ":"})


def _aspect(option: str, value: str) -> str:
    value = "".join(str(unicodedata.decimal(c)) if c.isdecimal() else c for c in value)
    value = value.translate(_RATIO_SIGNS)
    if value not in ASPECT_RATIOS:
        raise CommandError(
            "error.option_choice",
            option=option,
            value=_shown(value),
            choices=", ".join(ASPECT_RATIOS),
        )
    return value


def _style_name(option: str, value: str) -> str:
    # Names are checked against the catalogue when the job is planned.
    return value.lower()


def _negative(option: str, value: str) -> str:
    if len(value) > MAX_NEGATIVE_CHARS:
        raise CommandError(
            "error.negative_too_long", option=option, limit=MAX_NEGATIVE_CHARS, length=len(value)
        )
    return value


# Option name -> (field of GenerationOptions, value parser).
_OPTIONS = {
    "--ar": ("aspect_ratio", _aspect),
    "--seed": ("seed", lambda o, v: _int_in(o, v, SEED_RANGE)),
    "--steps": ("steps", lambda o, v: _int_in(o, v, STEPS_RANGE)),
    "--n": ("images", lambda o, v: _int_in(o, v, IMAGES_RANGE)),
    "--style": ("style", _style_name),
    "--no": ("negative", _negative),
}
# Options whose value is every word up to the next option (`--no text, watermark`).
_MULTI_WORD = frozenset({"--no"})

# Phone keyboards turn "--" into an en or em dash; accept what the user meant.
_DASHES = ("\u2014", "\u2013")


def _as_option(token: str) -> str | None:
    for dash in _DASHES:
        if token.startswith(dash):
            token = "--" + token[len(dash) :]
            break
    return token if token.startswith("--") and len(token) > 2 else None


# How many images a command makes when the user does not say.
DEFAULT_IMAGES: Mapping[Command, int] = {Command.PORTRAIT: 1, Command.AVATAR: 4}


def option_limits() -> dict[str, int]:
    """The bounds of each option, for help and usage texts."""
    return {
        "avatar_images": DEFAULT_IMAGES[Command.AVATAR],
        "steps_low": STEPS_RANGE[0],
        "steps_high": STEPS_RANGE[1],
        "images_low": IMAGES_RANGE[0],
        "images_high": IMAGES_RANGE[1],
        "seed_high": SEED_RANGE[1],
    }


def parse_image_command(command: Command, args: str) -> ImageRequest:
    """Parse the text after `/portrait` or `/avatar`: a free-text prompt with `--option value`
    pairs anywhere in it (`--ar=16:9` works too). For `/avatar` without `--style`, the first
    word of the prompt, if any, names the style (`/avatar --n 2 anime` too) and the rest are
    optional. Raises CommandError for bad input."""
    prompt_words: list[str] = []
    values: dict[str, Any] = {}
    tokens = args.split()
    i = 0
    while i < len(tokens):
        token = tokens[i]
        option = _as_option(token)
        if option is None:
            prompt_words.append(token)
            i += 1
            continue
        name, eq, inline_value = option.partition("=")
        name = name.lower()
        if name not in _OPTIONS:
            raise CommandError(
                "error.unknown_option", option=_shown(name), known=", ".join(_OPTIONS)
            )
        if name in _MULTI_WORD:
            words = [inline_value] if eq else []
            i += 1
            while i < len(tokens) and _as_option(tokens[i]) is None:
                words.append(tokens[i])
                i += 1
            value = " ".join(w for w in words if w)
        elif eq:
            value = inline_value
            i += 1
        elif i + 1 < len(tokens):
            value = tokens[i + 1]
            i += 2
        else:
            value = ""
            i += 1
        if not value:
            raise CommandError("error.option_missing_value", option=name)
        field_name, parse = _OPTIONS[name]
        if field_name in values:
            raise CommandError("error.option_repeated", option=name)
        values[field_name] = parse(name, value)
    if command == Command.AVATAR and "style" not in values and prompt_words:
        values["style"] = _style_name("--style", prompt_words.pop(0))
    prompt = " ".join(prompt_words)
    if not prompt and command != Command.AVATAR:
        raise CommandError("error.prompt_missing")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise CommandError("error.prompt_too_long", limit=MAX_PROMPT_CHARS, length=len(prompt))
    return ImageRequest(command=command, prompt=prompt, options=GenerationOptions(**values))


def image_size(aspect_ratio: str, base: int) -> tuple[int, int]:
    """Width and height for an aspect ratio, keeping about base² pixels, in multiples of 8."""
    w, h = ASPECT_RATIOS[aspect_ratio]
    scale = math.sqrt(base * base / (w * h))

    def snap(x: float) -> int:
        return max(SIZE_MULTIPLE, round(x / SIZE_MULTIPLE) * SIZE_MULTIPLE)

    return snap(w * scale), snap(h * scale)


@dataclass(frozen=True)
class GenerationPlan:
    """Everything a worker needs to reproduce a job, fixed when the job is accepted."""

    prompt: str
    width: int
    height: int
    steps: int
    seeds: tuple[int, ...]
    guidance_scale: float
    negative_prompt: str = ""
    # The catalogue key of the style used, for captions; None for no style.
    style: str | None = None
    # img2img: how far from the input image to go (0 keeps it, 1 ignores it).
    strength: float | None = None
    # A LoRA weights file switched on for this job, and its weight.
    lora: str | None = None
    lora_scale: float = 1.0


BatchKey = tuple[object, ...]


def batch_key(kind: JobKind, plan: GenerationPlan) -> BatchKey | None:
    """What jobs must share to be drawn in one pipeline call (dynamic batching), or None for
    a job that is always drawn alone. Text-to-image jobs batch when the call's shared
    arguments agree: size, steps, guidance, images per prompt, the style LoRA and its weight,
    and whether a negative prompt is given. Prompts and seeds may differ. Jobs that start
    from an image (avatars, variations, upscales) and preview grids run alone."""
    if kind != JobKind.PORTRAIT:
        return None
    return (
        plan.width,
        plan.height,
        plan.steps,
        plan.guidance_scale,
        len(plan.seeds),
        plan.lora,
        plan.lora_scale if plan.lora else None,
        bool(plan.negative_prompt),
    )


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Its images were flagged by the content check and not sent (credits refunded).
    BLOCKED = "blocked"


ACTIVE_STATUSES = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})
# A job recorded but not answered for this long was left by a bot that stopped midway; a
# repeat of its update arriving sooner is the same request, still being handled.
UNANSWERED_ABANDONED_AFTER_S = 30.0


def was_abandoned(
    status: JobStatus, answered: bool, age_seconds: float, asked_before: bool = False
) -> bool:
    """Whether a request's job, found when the request comes again, is to be answered and
    handed over now: nobody answered it and it waits, and either its bot stopped midway or
    the request is asked again by the bot that asked first and never heard back (its intake
    failed after writing the job, or died with it in hand)."""
    return (
        status == JobStatus.QUEUED
        and not answered
        and (asked_before or age_seconds > UNANSWERED_ABANDONED_AFTER_S)
    )


# A job whose worker died this many times is given up, so one bad job cannot loop forever.
MAX_ATTEMPTS = 3
TRANSITIONS: Mapping[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELLED}),
    # RUNNING -> RUNNING: a redelivered task picks the job up again after a worker died.
    # RUNNING -> QUEUED: the reconciler hands a dead worker's job back to the queue.
    JobStatus.RUNNING: frozenset(
        {
            JobStatus.QUEUED,
            JobStatus.RUNNING,
            JobStatus.DONE,
            JobStatus.FAILED,
            JobStatus.CANCELLED,
            JobStatus.BLOCKED,
        }
    ),
    JobStatus.DONE: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
    JobStatus.BLOCKED: frozenset(),
}


class InvalidTransition(RuntimeError):
    pass


def check_transition(current: JobStatus, new: JobStatus) -> None:
    if new not in TRANSITIONS[current]:
        raise InvalidTransition(f"job cannot go from {current} to {new}")


@dataclass
class ProgressThrottle:
    """Lets a progress update through at most once per `interval` seconds. Updates in between
    are dropped, never queued: only the latest progress is worth showing."""

    interval: float
    _last: float | None = None

    def allow(self, now: float) -> bool:
        if self._last is not None and now - self._last < self.interval:
            return False
        self._last = now
        return True
