"""From a request or a button press to a plan: defaults, styles and follow-ups."""

from __future__ import annotations

import random

import pytest

from chitrakar.buttons import (
    UPSCALE_STRENGTH,
    VARIATION_STRENGTH,
    Action,
    ButtonPress,
    ButtonRefused,
)
from chitrakar.domain import (
    Command,
    CommandError,
    GenerationOptions,
    GenerationPlan,
    ImageRequest,
    JobKind,
    parse_image_command,
)
from chitrakar.planning import (
    Defaults,
    choose_style,
    plan_followup,
    plan_request,
    usual_sizes,
)
from chitrakar.styles import load_catalogue

CATALOGUE = load_catalogue()
DEFAULTS = Defaults(base_size=512, steps=25, guidance_scale=7.0)


def plan_of(text: str, command: Command = Command.PORTRAIT, default: str | None = None):  # type: ignore[no-untyped-def]
    request = parse_image_command(command, text)
    style = choose_style(request, CATALOGUE, default)
    return plan_request(
        request, style, avatar_prompt="a portrait", defaults=DEFAULTS, rng=random.Random(0)
    )


def seeds(**options: object) -> tuple[int, ...]:
    request = ImageRequest(Command.PORTRAIT, "p", GenerationOptions(**options))  # type: ignore[arg-type]
    return plan_request(
        request, None, avatar_prompt="", defaults=DEFAULTS, rng=random.Random(0)
    ).seeds


def test_seeds_follow_a_given_seed_and_wrap() -> None:
    assert seeds(seed=10, images=3) == (10, 11, 12)
    assert seeds(seed=2**32 - 1, images=2) == (2**32 - 1, 0)


def test_seeds_without_a_seed_are_random_but_consecutive() -> None:
    first, second = seeds(images=2)
    assert second == (first + 1) % 2**32


def test_a_portrait_without_a_style_uses_the_deployment_defaults() -> None:
    plan = plan_of("a tea stall at dusk --steps 9")
    assert (plan.prompt, plan.steps, plan.width, plan.height) == (
        "a tea stall at dusk",
        9,
        512,
        512,
    )
    assert (plan.style, plan.strength, plan.negative_prompt, plan.guidance_scale) == (
        None,
        None,
        "",
        7.0,
    )
    assert len(plan.seeds) == 1


def test_a_style_fills_prompt_negative_steps_guidance_and_ratio() -> None:
    style = CATALOGUE.get("madhubani")
    assert style is not None
    plan = plan_of("a fisherwoman --style madhubani --no blue sky, clouds")
    assert plan.prompt == style.render("a fisherwoman")
    assert plan.negative_prompt == f"{style.negative}, blue sky, clouds"
    assert (plan.steps, plan.guidance_scale, plan.style) == (
        style.steps,
        style.guidance,
        "madhubani",
    )
    assert plan.width / plan.height == pytest.approx(
        eval(style.aspect_ratio.replace(":", "/")),  # noqa: S307
        rel=0.05,
    )


def test_the_users_options_win_over_the_style() -> None:
    plan = plan_of("a fort --style warli --steps 7 --ar 16:9")
    assert plan.steps == 7 and plan.width > plan.height


def test_the_users_default_style_applies_unless_none_is_asked() -> None:
    assert plan_of("a fort", default="anime").style == "anime"
    assert plan_of("a fort --style none", default="anime").style is None
    # A default the deployment has since removed is ignored.
    assert plan_of("a fort", default="no-longer-there").style is None


def test_an_unknown_style_is_refused_with_the_known_ones() -> None:
    with pytest.raises(CommandError) as refused:
        plan_of("a fort --style cubist-ish")
    assert refused.value.key == "error.unknown_style"
    assert "madhubani" in refused.value.params["known"]


def test_an_avatar_makes_four_from_the_selfie_in_its_style() -> None:
    plan = plan_of("watercolour", Command.AVATAR)
    style = CATALOGUE.get("watercolour")
    assert style is not None
    assert len(plan.seeds) == 4
    assert plan.prompt == style.render("a portrait")
    assert plan.strength == style.strength


def test_an_avatar_with_no_style_named_uses_the_catalogues_default() -> None:
    plan = plan_of("--n 2", Command.AVATAR)
    assert plan.style == CATALOGUE.default_style.key and len(plan.seeds) == 2


PARENT = GenerationPlan(
    prompt="p",
    width=512,
    height=640,
    steps=20,
    seeds=(5, 6, 7, 8),
    guidance_scale=7.0,
    style="anime",
    strength=0.7,
)


def test_again_keeps_everything_but_the_seeds() -> None:
    kind, plan = plan_followup(
        JobKind.AVATAR, PARENT, ButtonPress(Action.AGAIN, job_id=1), random.Random(1)
    )
    assert kind == JobKind.AVATAR
    assert plan.seeds != PARENT.seeds and len(plan.seeds) == 4
    assert plan.prompt == PARENT.prompt and plan.strength == PARENT.strength


def test_a_variation_is_img2img_of_one_image() -> None:
    kind, plan = plan_followup(
        JobKind.AVATAR, PARENT, ButtonPress(Action.VARIATION, 1, 2), random.Random(1)
    )
    assert kind == JobKind.VARIATION and plan.strength == VARIATION_STRENGTH


def test_an_upscale_doubles_one_image_and_keeps_its_seed() -> None:
    kind, plan = plan_followup(
        JobKind.PORTRAIT, PARENT, ButtonPress(Action.UPSCALE, 1, 2), random.Random(1)
    )
    assert kind == JobKind.UPSCALE
    assert (plan.width, plan.height, plan.seeds, plan.strength) == (
        1024,
        1280,
        (7,),
        UPSCALE_STRENGTH,
    )


def test_presses_that_cannot_be_done_are_refused() -> None:
    with pytest.raises(ButtonRefused) as refused:
        plan_followup(JobKind.PORTRAIT, PARENT, ButtonPress(Action.UPSCALE, 1, 4), random.Random())
    assert refused.value.key == "button.stale"
    huge = GenerationPlan("p", 4096, 4096, 20, (1,), 7.0)
    with pytest.raises(ButtonRefused) as refused:
        plan_followup(JobKind.PORTRAIT, huge, ButtonPress(Action.UPSCALE, 1, 0), random.Random())
    assert refused.value.key == "button.too_large"


@pytest.mark.parametrize(
    ("kind", "press"),
    [
        (JobKind.UPSCALE, ButtonPress(Action.VARIATION, 1, 0)),  # no untiled 2x variations
        (JobKind.UPSCALE, ButtonPress(Action.AGAIN, 1)),
        (JobKind.PREVIEWS, ButtonPress(Action.AGAIN, 1)),
        (JobKind.PORTRAIT, ButtonPress(Action.PICK, 1, 0)),
    ],
)
def test_a_press_the_result_does_not_offer_is_refused(kind: JobKind, press: ButtonPress) -> None:
    with pytest.raises(ButtonRefused) as refused:
        plan_followup(kind, PARENT, press, random.Random())
    assert refused.value.key == "button.stale"


def test_the_usual_sizes_are_every_size_a_job_takes_without_its_own_ratio() -> None:
    sizes = usual_sizes(CATALOGUE, 512)
    # Square first (a command without a style), then the built-in styles' 4:5 and 2:3, once each.
    assert sizes == [(512, 512), (456, 576), (416, 624)]
    planned = {(plan.width, plan.height) for plan in [plan_of("a cat")]} | {
        (plan.width, plan.height)
        for key in CATALOGUE.styles
        for plan in [plan_of(f"a cat --style {key}")]
    }
    assert planned == set(sizes)
