"""From a request (or a button press) to the exact plan a worker follows. Plain Python, no I/O:
the caller passes in the catalogue, the user's default style and a random source."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from chitrakar.buttons import (
    MAX_UPSCALED_SIDE,
    UPSCALE_FACTOR,
    UPSCALE_STRENGTH,
    VARIATION_STRENGTH,
    Action,
    ButtonPress,
    ButtonRefused,
    offered_actions,
)
from chitrakar.domain import (
    DEFAULT_IMAGES,
    NO_STYLE,
    SEED_RANGE,
    Command,
    CommandError,
    GenerationPlan,
    ImageRequest,
    JobKind,
    image_size,
)
from chitrakar.styles import Style, StyleCatalogue

# An avatar without a style keeps this much of the selfie.
PLAIN_AVATAR_STRENGTH = 0.6


@dataclass(frozen=True)
class Defaults:
    """What the deployment decides where neither the user nor the style does."""

    base_size: int
    steps: int
    guidance_scale: float


def choose_style(
    request: ImageRequest, catalogue: StyleCatalogue, user_default: str | None
) -> Style | None:
    """The style a request uses: the one it names, else the user's default, else (for an
    avatar) the catalogue's. `--style none` means none. Raises CommandError for a name the
    catalogue does not have."""
    named = request.options.style
    if named == NO_STYLE:
        return None
    if named is not None:
        style = catalogue.get(named)
        if style is None:
            raise CommandError(
                "error.unknown_style", style=named[:40], known=", ".join(catalogue.style_keys())
            )
        return style
    # A default the deployment has since removed is ignored rather than refused.
    if user_default is not None and (style := catalogue.get(user_default)) is not None:
        return style
    return catalogue.default_style if request.command == Command.AVATAR else None


def _seeds(first: int | None, count: int, rng: random.Random) -> tuple[int, ...]:
    start = first if first is not None else rng.randint(*SEED_RANGE)
    return tuple((start + i) % (SEED_RANGE[1] + 1) for i in range(count))


def plan_request(
    request: ImageRequest,
    style: Style | None,
    *,
    avatar_prompt: str,
    defaults: Defaults,
    rng: random.Random,
) -> GenerationPlan:
    """The user's options win over the style's, and the style's over the deployment's."""
    opts = request.options
    subject = request.prompt or avatar_prompt
    prompt = style.render(subject) if style else subject
    negatives = [n for n in ((style.negative if style else ""), opts.negative or "") if n]
    aspect = opts.aspect_ratio or (style.aspect_ratio if style else "1:1")
    width, height = image_size(aspect, defaults.base_size)
    strength: float | None = None
    if request.command == Command.AVATAR:
        strength = style.strength if style else PLAIN_AVATAR_STRENGTH
    return GenerationPlan(
        prompt=prompt,
        width=width,
        height=height,
        steps=opts.steps or (style.steps if style else defaults.steps),
        seeds=_seeds(opts.seed, opts.images or DEFAULT_IMAGES[request.command], rng),
        guidance_scale=style.guidance if style else defaults.guidance_scale,
        negative_prompt=", ".join(negatives),
        style=style.key if style else None,
        strength=strength,
        lora=str(style.lora) if style and style.lora else None,
        lora_scale=style.lora_scale if style else 1.0,
    )


def usual_sizes(catalogue: StyleCatalogue, base: int) -> list[tuple[int, int]]:
    """The image sizes jobs take unless a user asks for an aspect ratio of their own: a
    command without a style (1:1) and each style's, in that order, each once. A compiled
    worker compiles these before its first job, so that no user waits for it."""
    ratios = ["1:1", *(style.aspect_ratio for style in catalogue.styles.values())]
    return list(dict.fromkeys(image_size(ratio, base) for ratio in ratios))


def plan_followup(
    parent_kind: JobKind, parent: GenerationPlan, press: ButtonPress, rng: random.Random
) -> tuple[JobKind, GenerationPlan]:
    """The job a result's button asks for. Raises ButtonRefused when it cannot be done,
    including a press (forged, or from an older version) that the result does not offer."""
    count = len(parent.seeds)
    if press.action not in offered_actions(parent_kind, count):
        raise ButtonRefused("button.stale")
    if press.action == Action.AGAIN:
        return parent_kind, replace(parent, seeds=_seeds(None, count, rng))
    index = press.index
    if index is None or not 0 <= index < count:
        raise ButtonRefused("button.stale")
    if press.action == Action.VARIATION:
        return JobKind.VARIATION, replace(
            parent, seeds=_seeds(None, count, rng), strength=VARIATION_STRENGTH
        )
    if press.action == Action.UPSCALE:
        width, height = parent.width * UPSCALE_FACTOR, parent.height * UPSCALE_FACTOR
        if max(width, height) > MAX_UPSCALED_SIDE:
            raise ButtonRefused("button.too_large", limit=MAX_UPSCALED_SIDE)
        return JobKind.UPSCALE, replace(
            parent,
            width=width,
            height=height,
            seeds=(parent.seeds[index],),
            strength=UPSCALE_STRENGTH,
        )
    raise ButtonRefused("button.stale")
