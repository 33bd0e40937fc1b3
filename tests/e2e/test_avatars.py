"""Avatars from a selfie, the buttons under results and the style catalogue, end to end: the
real bot and a real worker (`chitrakar run`, tiny model) against the Bot API emulator, with
real photographs that ship with scikit-image."""

from __future__ import annotations

import io
import itertools
import json
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from skimage import data as photographs

from chitrakar.buttons import UPSCALE_FACTOR
from chitrakar.styles import load_catalogue
from chitrakar.texts import text
from db.models import Job
from tests.support.botapi import BotApiEmulator, Call, Fault
from tests.support.stack import (
    TEST_IMAGE_SIZE,
    chitrakar_env,
    chitrakar_process,
    jobs_in_chat,
)
from workers.delivery import _as_photo

pytestmark = pytest.mark.e2e
_fresh_ids = itertools.count(3000)
CATALOGUE = load_catalogue()
Stack = tuple[BotApiEmulator, str]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Stack]:
    emulator = BotApiEmulator().start()
    data_dir = tmp_path_factory.mktemp("data")
    # Selfie crops kept a day, for 🔄 Again on avatars (by default they go with their job).
    env = chitrakar_env(emulator, data_dir, tiny_model, input_retention_hours="24")
    with chitrakar_process("run", env=env, log_dir=data_dir):
        emulator.wait_for("setMyCommands", lambda c: c.params.get("language_code") == "hi", 60)
        yield emulator, f"sqlite:///{data_dir / 'chitrakar.db'}"
    emulator.stop()


def encoded(image: Image.Image, format: str = "JPEG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def selfie() -> Image.Image:
    return Image.fromarray(photographs.astronaut())


def replying_to(message: dict[str, Any]) -> Callable[[Call], bool]:
    def check(call: Call) -> bool:
        reply = call.params.get("reply_parameters") or {}
        return (
            call.params.get("chat_id") == message["chat"]["id"]
            and reply.get("message_id") == message["message_id"]
        )

    return check


def answer_to(message: dict[str, Any]) -> Callable[[Call], bool]:
    """A message the bot sent in the chat after `message` (quoted in groups only)."""

    def check(call: Call) -> bool:
        result = call.result if isinstance(call.result, dict) else {}
        return (
            call.params.get("chat_id") == message["chat"]["id"]
            and result.get("message_id", 0) > message["message_id"]
        )

    return check


def stored(database_url: str, key: str) -> bytes:
    """A result as the artifact store (the data folder, by default) holds it."""
    return (Path(database_url.removeprefix("sqlite:///")).parent / key).read_bytes()


def new_user(emulator: BotApiEmulator) -> tuple[dict[str, Any], dict[str, Any]]:
    user = emulator.user(next(_fresh_ids), "Meera")
    return user, emulator.private_chat(user)


def wait_done(database_url: str, chat_id: int, count: int = 1) -> list[Job]:
    """The chat's jobs once `count` of them have ended; all must have succeeded."""
    deadline = time.monotonic() + 240
    while True:
        jobs = jobs_in_chat(database_url, chat_id)
        ended = [j for j in jobs if j.status in ("done", "failed")]
        if len(ended) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [j.status for j in jobs] == ["done"] * count, [j.error for j in jobs]
    return jobs


def keyboard_message(emulator: BotApiEmulator, album: Call) -> dict[str, Any]:
    """The message with the buttons under an album (an album itself carries none)."""
    first = album.result[0]
    call = emulator.wait_for("sendMessage", replying_to(first), timeout=60)
    return dict(call.result)


def callback_data(emulator: BotApiEmulator, message: dict[str, Any]) -> list[str]:
    return [b["callback_data"] for row in emulator.buttons_of(message) for b in row]


def test_a_selfie_captioned_avatar_comes_back_as_an_album_of_four(stack: Stack) -> None:
    emulator, database_url = stack
    user, chat = new_user(emulator)
    photo = emulator.send_photo(chat, user, encoded(selfie()), caption="/avatar watercolour")

    status = emulator.wait_for("sendMessage", replying_to(photo), timeout=60)
    assert status.params["text"] == text("en", "status.queued", position=1)
    album = emulator.wait_for("sendMediaGroup", replying_to(photo), timeout=240)
    media = album.params["media"]
    assert len(media) == 4
    [job] = wait_done(database_url, chat["id"])
    assert (job.command, job.style, job.strength) == (
        "avatar",
        "watercolour",
        CATALOGUE.styles["watercolour"].strength,
    )
    for item, seed in zip(media, job.seeds, strict=True):
        assert item["caption"].startswith("Watercolour (watercolour) · seed ")
        assert f"seed {seed} ·" in item["caption"]
    # Each photo uploaded is the JPEG of its stored PNG, in the same order.
    for item, key in zip(media, job.result_paths, strict=True):
        upload = album.files[item["media"].removeprefix("attach://")]
        with Image.open(io.BytesIO(stored(database_url, key))) as png:
            assert png.format == "PNG"
            assert upload == _as_photo(png)
    # The aligned face is what the job starts from, at the model's size; the photo as sent is
    # never written.
    assert job.input_path is not None
    with Image.open(job.input_path) as face:
        assert face.size == (TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)

    buttons = keyboard_message(emulator, album)
    assert buttons["text"] == text("en", "button.avatar_album", count=4)
    assert callback_data(emulator, buttons) == [
        *(f"u:{job.id}:{i}" for i in range(4)),
        *(f"v:{job.id}:{i}" for i in range(4)),
        *(f"p:{job.id}:{i}" for i in range(4)),
        f"a:{job.id}",
    ]

    # Pick: one avatar as a file, full size, the very PNG the worker made.
    pressed = emulator.press(buttons, user, f"p:{job.id}:2")
    document = emulator.wait_for("sendDocument", replying_to(buttons), timeout=60)
    assert document.files["document"] == stored(database_url, job.result_paths[2])
    assert document.params["caption"] == text(
        "en", "button.pick_caption", width=job.width, height=job.height, seed=job.seeds[2]
    )
    assert emulator.wait_for_answer(pressed).result is True


def test_a_reply_to_a_photo_and_an_uncompressed_heic_file(stack: Stack) -> None:
    emulator, database_url = stack
    user, chat = new_user(emulator)
    photo = emulator.send_photo(chat, user, encoded(selfie()))
    emulator.wait_for(
        "sendMessage",
        lambda c: (
            c.params["chat_id"] == chat["id"] and c.params["text"] == text("en", "avatar.hint")
        ),
        timeout=30,
    )
    command = emulator.send_text(chat, user, "/avatar anime --n 2", reply_to=photo)
    album = emulator.wait_for("sendMediaGroup", replying_to(command), timeout=240)
    assert len(album.params["media"]) == 2

    heic = encoded(selfie(), "HEIF")
    sent = emulator.send_document(
        chat, user, heic, "IMG_0042.HEIC", "image/heic", caption="/avatar pencil-sketch --n 1"
    )
    single = emulator.wait_for("sendPhoto", replying_to(sent), timeout=240)
    assert single.params["caption"].startswith("Pencil sketch (pencil-sketch) · seed ")
    jobs = wait_done(database_url, chat["id"], 2)
    assert [(j.command, j.style, len(j.seeds)) for j in jobs] == [
        ("avatar", "anime", 2),
        ("avatar", "pencil-sketch", 1),
    ]


def test_an_avatar_is_made_only_from_ones_own_photo(stack: Stack) -> None:
    """Bob's /avatar as a reply to Alice's selfie would keep her face outside her /export and
    /forget: refused."""
    emulator, database_url = stack
    alice, bob = (emulator.user(next(_fresh_ids), name) for name in ("Alice", "Bob"))
    group = emulator.group_chat(-250_000 - next(_fresh_ids))
    photo = emulator.send_photo(group, alice, encoded(selfie()))
    command = emulator.send_text(group, bob, "/avatar anime", reply_to=photo)
    assert emulator.wait_for("sendMessage", answer_to(command), 60).params["text"] == text(
        "en", "avatar.not_your_photo"
    )
    assert jobs_in_chat(database_url, group["id"]) == []


def _two_faces() -> Image.Image:
    face = selfie().crop((120, 0, 320, 260))
    canvas = Image.new("RGB", (600, 400), "white")
    canvas.paste(face, (50, 70))
    canvas.paste(face, (350, 70))
    return canvas


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (300, 300), colour) for colour in ("red", "blue")]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


BAD_PHOTOS: list[
    tuple[str, Callable[[], tuple[str, bytes, dict[str, Any]]], str, dict[str, Any]]
] = [
    (
        "a cat",
        lambda: ("photo", encoded(Image.fromarray(photographs.chelsea())), {}),
        "photo.no_face",
        {},
    ),
    ("two people", lambda: ("photo", encoded(_two_faces()), {}), "photo.many_faces", {"count": 2}),
    (
        "a PDF",
        lambda: (
            "document",
            b"%PDF-1.7\n" + b"0" * 2000,
            {"file_name": "cv.pdf", "mime_type": "application/pdf"},
        ),
        "photo.not_an_image",
        {},
    ),
    (
        "half a JPEG",
        lambda: (
            "document",
            encoded(selfie())[:20000],
            {"file_name": "cut.jpg", "mime_type": "image/jpeg"},
        ),
        "photo.damaged",
        {},
    ),
    (
        "an animation",
        lambda: ("document", _animated_gif(), {"file_name": "dance.gif", "mime_type": "image/gif"}),
        "photo.animated",
        {},
    ),
    (
        "a 25 MB file",
        lambda: (
            "document",
            encoded(selfie()),
            {"file_name": "big.jpg", "mime_type": "image/jpeg", "declared_size": 25 * 2**20},
        ),
        "photo.too_large",
        {"limit_mb": 20},
    ),
    (
        "a banner",
        lambda: ("photo", encoded(Image.new("RGB", (2000, 300))), {}),
        "photo.bad_shape",
        {"ratio": 4},
    ),
    (
        "a thumbnail",
        lambda: ("photo", encoded(selfie().resize((100, 100))), {}),
        "photo.too_small",
        {"min_side": 128},
    ),
]


@pytest.mark.parametrize(
    ("what", "make", "key", "params"), BAD_PHOTOS, ids=[case[0] for case in BAD_PHOTOS]
)
def test_a_bad_photo_gets_a_clear_reply_and_nothing_is_queued(
    stack: Stack,
    what: str,
    make: Callable[[], tuple[str, bytes, dict[str, Any]]],
    key: str,
    params: dict[str, Any],
) -> None:
    emulator, database_url = stack
    user, chat = new_user(emulator)
    kind, payload, extra = make()
    if kind == "photo":
        message = emulator.send_photo(chat, user, payload, caption="/avatar anime")
    else:
        message = emulator.send_document(
            chat,
            user,
            payload,
            extra.pop("file_name"),
            extra.pop("mime_type"),
            caption="/avatar anime",
            **extra,
        )
    reply = emulator.wait_for("sendMessage", answer_to(message), timeout=60)
    assert reply.params["text"] == text("en", key, **params)
    assert jobs_in_chat(database_url, chat["id"]) == []


def test_a_gif_or_a_reply_to_one_is_told_to_send_a_still_photo(stack: Stack) -> None:
    emulator, database_url = stack
    user, chat = new_user(emulator)
    gif = emulator.send_animation(chat, user, b"\x00\x00\x00\x18ftypmp42", caption="/avatar")
    assert emulator.wait_for("sendMessage", answer_to(gif), 30).params["text"] == text(
        "en", "photo.animated"
    )
    reply = emulator.send_text(chat, user, "/avatar anime", reply_to=gif)
    assert emulator.wait_for("sendMessage", answer_to(reply), 30).params["text"] == text(
        "en", "photo.animated"
    )
    assert jobs_in_chat(database_url, chat["id"]) == []


def test_avatar_without_a_photo_or_with_an_unknown_style(stack: Stack) -> None:
    emulator, database_url = stack
    user, chat = new_user(emulator)
    bare = emulator.send_text(chat, user, "/avatar watercolour")
    assert emulator.wait_for("sendMessage", answer_to(bare), 30).params["text"] == text(
        "en", "avatar.how"
    )
    photo = emulator.send_photo(chat, user, encoded(selfie()), caption="/avatar cubist")
    reply = emulator.wait_for("sendMessage", answer_to(photo), 60).params["text"]
    assert reply.startswith(
        text("en", "error.unknown_style", style="cubist", known=", ".join(CATALOGUE.style_keys()))
    )
    assert jobs_in_chat(database_url, chat["id"]) == []


def test_each_button_starts_its_job_and_the_result_arrives(stack: Stack) -> None:
    emulator, database_url = stack
    user, chat = new_user(emulator)
    command = emulator.send_text(
        chat, user, "/portrait a lotus pond --n 2 --style madhubani --no clouds, boats"
    )
    album = emulator.wait_for("sendMediaGroup", replying_to(command), timeout=240)
    [portrait] = wait_done(database_url, chat["id"])
    caption = album.params["media"][1]["caption"]
    assert caption.startswith(f"Madhubani (madhubani) · seed {portrait.seeds[1]} · ")
    assert caption.endswith("\nWithout: clouds, boats")
    buttons = keyboard_message(emulator, album)
    assert buttons["text"] == text("en", "button.album", count=2)

    upscale = emulator.press(buttons, user, f"u:{portrait.id}:1")
    answer = emulator.wait_for_answer(upscale)
    assert answer.params["text"].startswith("Queued.")
    big = emulator.wait_for(
        "sendPhoto", lambda c: replying_to(buttons)(c) and "Upscaled" in c.params["caption"], 240
    )
    with Image.open(io.BytesIO(big.files["photo"])) as image:
        assert image.size == (portrait.width * UPSCALE_FACTOR, portrait.height * UPSCALE_FACTOR)
    assert [
        b["callback_data"] for row in big.params["reply_markup"]["inline_keyboard"] for b in row
    ] == [f"p:{portrait.id + 1}:0"]

    emulator.press(buttons, user, f"v:{portrait.id}:0")
    emulator.press(buttons, user, f"a:{portrait.id}")
    jobs = wait_done(database_url, chat["id"], 4)
    # The bot takes updates concurrently: the last two presses may be recorded in any order.
    upscaled = jobs[1]
    [varied] = [j for j in jobs if j.command == "variation"]
    [again] = [j for j in jobs[2:] if j.command == "portrait"]
    assert (upscaled.command, upscaled.parent_job_id, upscaled.parent_index) == (
        "upscale",
        portrait.id,
        1,
    )
    assert upscaled.seeds == [portrait.seeds[1]]
    assert (varied.command, varied.parent_job_id, varied.parent_index) == (
        "variation",
        portrait.id,
        0,
    )
    assert (again.command, again.prompt, again.style) == ("portrait", portrait.prompt, "madhubani")
    assert set(again.seeds).isdisjoint(portrait.seeds)
    albums = [c for c in emulator.calls_to("sendMediaGroup", chat["id"]) if replying_to(buttons)(c)]
    assert len(albums) == 2  # the variations and the set made again, each as an album of two


def test_in_a_group_only_the_requester_or_an_admin_may_press(stack: Stack) -> None:
    emulator, database_url = stack
    asker, stranger, admin = (emulator.user(next(_fresh_ids), n) for n in ("Ravi", "Sam", "Ila"))
    group = emulator.group_chat(-100_000 - next(_fresh_ids))
    emulator.set_admins(group["id"], [admin["id"]])
    command = emulator.send_text(
        group, asker, f"/portrait@{emulator.username} a monsoon street --n 1"
    )
    photo = emulator.wait_for("sendPhoto", replying_to(command), timeout=240)
    [job] = wait_done(database_url, group["id"])

    refused = emulator.press(photo.result, stranger, f"u:{job.id}:0")
    answer = emulator.wait_for_answer(refused)
    assert answer.params["text"] == text("en", "button.not_yours")
    assert answer.params["show_alert"] is True
    again = emulator.press(photo.result, stranger, f"a:{job.id}")
    assert emulator.wait_for_answer(again).params["text"] == text("en", "button.not_yours")
    assert len(jobs_in_chat(database_url, group["id"])) == 1

    allowed = emulator.press(photo.result, admin, f"v:{job.id}:0")
    assert emulator.wait_for_answer(allowed).params["text"].startswith("Queued.")
    assert len(wait_done(database_url, group["id"], 2)) == 2


def test_stale_and_forged_buttons_answer_politely(stack: Stack) -> None:
    emulator, database_url = stack
    user, chat = new_user(emulator)
    command = emulator.send_text(chat, user, "/portrait a kite festival")
    photo = emulator.wait_for("sendPhoto", replying_to(command), timeout=240)
    [job] = wait_done(database_url, chat["id"])
    cases = [
        (f"u:{job.id + 10_000}:0", "button.stale"),  # no such job
        (f"u:{job.id}:3", "button.stale"),  # no such image
        ("u:1:x", "button.invalid"),
        ("rm -rf /", "button.invalid"),
    ]
    for data, key in cases:
        pressed = emulator.press(photo.result, user, data, check_button=False)
        assert emulator.wait_for_answer(pressed).params["text"] == text("en", key), data
    # A press Telegram delivers twice makes one job.
    pressed = emulator.press(photo.result, user, f"v:{job.id}:0")
    emulator.offer_press_again(pressed)
    wait_done(database_url, chat["id"], 2)
    assert len(jobs_in_chat(database_url, chat["id"])) == 2
    assert emulator.wait_for_answer(pressed).params["text"].startswith("Queued.")


def test_styles_lists_then_shows_the_cached_grid_and_sets_a_default(stack: Stack) -> None:
    emulator, database_url = stack
    user, chat = new_user(emulator)
    first = emulator.send_text(chat, user, "/styles")
    listing = emulator.wait_for("sendMessage", answer_to(first), timeout=30)
    assert listing.params["text"].startswith(text("en", "styles.list", lines="")[:20])
    for style in CATALOGUE.styles.values():
        assert f"{style.name_in('en')} ({style.key})" in listing.params["text"]
    grid = emulator.wait_for("sendPhoto", replying_to(first), timeout=300)
    assert grid.params["caption"] == text("en", "styles.grid_caption")
    styles_pressable = [
        b["callback_data"] for row in grid.params["reply_markup"]["inline_keyboard"] for b in row
    ]
    assert styles_pressable == [f"s:{key}" for key in CATALOGUE.style_keys()]

    # Now cached: the grid comes at once, made by no new job.
    jobs_before = len(jobs_in_chat(database_url, chat["id"]))
    second = emulator.send_text(chat, user, "/styles")
    cached = emulator.wait_for("sendPhoto", answer_to(second), timeout=30)
    assert cached.files["photo"] == grid.files["photo"]
    assert len(jobs_in_chat(database_url, chat["id"])) == jobs_before

    pressed = emulator.press(cached.result, user, "s:warli")
    assert emulator.wait_for_answer(pressed).params["text"] == text(
        "en", "button.style_set", name="Warli"
    )
    command = emulator.send_text(chat, user, "/portrait a harvest dance")
    emulator.wait_for("sendPhoto", replying_to(command), timeout=240)
    assert jobs_in_chat(database_url, chat["id"])[-1].style == "warli"


def test_a_forged_press_from_another_chat_is_refused(stack: Stack) -> None:
    """Callback data can say anything: a job's buttons work only in the chat of its result,
    even for an admin of another group."""
    emulator, database_url = stack
    user = emulator.user(next(_fresh_ids), "Gita")
    chat = emulator.group_chat(-300_000 - next(_fresh_ids))
    command = emulator.send_text(chat, user, "/portrait a quiet ghat at dawn")
    emulator.wait_for("sendPhoto", replying_to(command), timeout=240)
    [job] = wait_done(database_url, chat["id"])

    # An admin of their own group, where the bot is too.
    thief = emulator.user(next(_fresh_ids), "Mallory")
    group = emulator.group_chat(-200_000 - next(_fresh_ids))
    emulator.set_admins(group["id"], [thief["id"]], creator=thief["id"])
    emulator.send_text(group, thief, "/styles")
    # The styles come as a list, or as the grid once it is cached: either has buttons.
    deadline = time.monotonic() + 30
    while not (
        answers := [
            c for m in ("sendMessage", "sendPhoto") for c in emulator.calls_to(m, group["id"])
        ]
    ):
        assert time.monotonic() < deadline, "no answer to /styles"
        time.sleep(0.1)
    for data in (f"v:{job.id}:0", f"u:{job.id}:0", f"a:{job.id}"):
        pressed = emulator.press(answers[0].result, thief, data, check_button=False)
        assert emulator.wait_for_answer(pressed).params["text"] == text("en", "button.stale")
    assert [j.command for j in jobs_in_chat(database_url, group["id"])] in ([], ["previews"])
    assert len(jobs_in_chat(database_url, chat["id"])) == 1


def test_again_on_an_avatar_starts_from_the_same_selfie(stack: Stack) -> None:
    emulator, database_url = stack
    user, chat = new_user(emulator)
    photo = emulator.send_photo(chat, user, encoded(selfie()), caption="/avatar kathakali --n 1")
    result = emulator.wait_for("sendPhoto", replying_to(photo), timeout=240)
    [avatar] = wait_done(database_url, chat["id"])
    # The first answer to a press fails (the query timed out in a backlog): the job goes on.
    emulator.fail("answerCallbackQuery", 400, "Bad Request: query is too old")
    emulator.press(result.result, user, f"a:{avatar.id}")
    again = emulator.wait_for("sendPhoto", lambda c: replying_to(result.result)(c), timeout=240)
    first, second = wait_done(database_url, chat["id"], 2)
    assert (second.command, second.input_path, second.style) == (
        "avatar",
        first.input_path,
        "kathakali",
    )
    assert again.params["caption"].startswith("Kathakali (kathakali) · seed ")


def _buttons_under_an_album(emulator: BotApiEmulator, chat_id: int) -> list[Call]:
    """The tries to send the message with an album's buttons, refused ones too."""
    return [c for c in emulator.calls_to("sendMessage", chat_id) if "reply_markup" in c.params]


def test_an_album_whose_buttons_are_refused_is_still_done(stack: Stack) -> None:
    emulator, database_url = stack
    user, chat = new_user(emulator)
    command = emulator.send_text(chat, user, "/portrait rangoli at the door --n 2")
    emulator.wait_for("sendMessage", replying_to(command), timeout=30)  # the status message
    # The next message in this chat is the buttons' own, under the album.
    emulator.fail("sendMessage", 400, "Bad Request: emulated failure", chat_id=chat["id"])
    album = emulator.wait_for("sendMediaGroup", replying_to(command), timeout=240)
    [job] = wait_done(database_url, chat["id"])
    assert len(job.result_paths) == 2
    assert len(album.params["media"]) == 2
    assert not [
        c for c in emulator.calls_to("editMessageText", chat["id"]) if "wrong" in c.params["text"]
    ]
    # Refused once (a 400 is final), not sent again. (They go after the job is recorded done.)
    emulator.wait_for(
        "sendMessage",
        lambda c: c.params.get("chat_id") == chat["id"] and "reply_markup" in c.params,
        timeout=30,
    )
    marker = emulator.send_text(chat, user, "/help")
    emulator.wait_for("sendMessage", answer_to(marker), timeout=30)
    [refused] = _buttons_under_an_album(emulator, chat["id"])
    assert isinstance(refused.result, Fault)


def test_album_buttons_are_sent_again_after_server_errors(stack: Stack) -> None:
    emulator, database_url = stack
    user, chat = new_user(emulator)
    command = emulator.send_text(chat, user, "/portrait rangoli by the well --n 2")
    emulator.wait_for("sendMessage", replying_to(command), timeout=30)  # the status message
    emulator.fail("sendMessage", 502, "Bad Gateway", times=2, chat_id=chat["id"])
    emulator.wait_for("sendMediaGroup", replying_to(command), timeout=240)
    # After 1 s and 2 s of waiting (delivery.SERVER_ERROR_BACKOFF_S), the third try arrives.
    buttons = emulator.wait_for(
        "sendMessage",
        # (wait_for holds the emulator's lock: this looks at the call alone.)
        lambda c: (
            c.params.get("chat_id") == chat["id"]
            and "reply_markup" in c.params
            and not isinstance(c.result, Fault)
        ),
        timeout=30,
    )
    tries = _buttons_under_an_album(emulator, chat["id"])
    assert [isinstance(c.result, Fault) for c in tries] == [True, True, False]
    assert tries[-1] is buttons
    [job] = wait_done(database_url, chat["id"])
    assert len(job.result_paths) == 2


def test_credits_run_out_with_a_clear_answer_and_quota_says_what_is_left(stack: Stack) -> None:
    emulator, database_url = stack
    user, chat = new_user(emulator)
    # 4 images at 40 steps cost 8 credits each time; the day's quota is 20.
    for n in range(2):
        command = emulator.send_text(
            chat, user, f"/portrait a tiger in the Sundarbans {n} --n 4 --steps 40"
        )
        emulator.wait_for("sendMediaGroup", replying_to(command), timeout=240)
        # The album's buttons follow it in a message of their own: once that is in, the next
        # message in the chat is the answer to the next command.
        emulator.wait_for(
            "sendMessage",
            lambda c, after=command: (
                answer_to(after)(c) and c.params["text"].startswith("Your 4 images")
            ),
            timeout=60,
        )
    over = emulator.send_text(chat, user, "/portrait one more tiger --n 4 --steps 40")
    refusal = emulator.wait_for("sendMessage", answer_to(over), timeout=30)
    assert refusal.params["text"].startswith(
        "That costs 8 credits and you have 4 left today. Your credits renew at 00:00 UTC."
    )
    assert len(jobs_in_chat(database_url, chat["id"])) == 2
    asked = emulator.send_text(chat, user, "/quota")
    status = emulator.wait_for("sendMessage", answer_to(asked), timeout=30)
    assert status.params["text"].startswith("Credits left today: 4 of 20. They renew at 00:00 UTC.")


def test_cancel_says_so_when_there_is_nothing_to_cancel(stack: Stack) -> None:
    emulator, _ = stack
    user, chat = new_user(emulator)
    asked = emulator.send_text(chat, user, "/cancel")
    reply = emulator.wait_for("sendMessage", answer_to(asked), timeout=30)
    assert reply.params["text"] == text("en", "cancel.nothing")


def test_history_export_and_forget(stack: Stack) -> None:
    emulator, database_url = stack
    user, chat = new_user(emulator)
    prompts = [f"diya number {n}" for n in range(6)]
    for prompt in prompts:
        command = emulator.send_text(chat, user, f"/portrait {prompt}")
        emulator.wait_for("sendPhoto", replying_to(command), timeout=240)
    made = wait_done(database_url, chat["id"], 6)

    asked = emulator.send_text(chat, user, "/history")
    page = emulator.wait_for("sendMessage", answer_to(asked), timeout=30).result
    assert page["text"].startswith(text("en", "history.header", page=1, pages=2))
    assert "diya number 5" in page["text"] and "diya number 0" not in page["text"]
    newest = made[-1]
    data = callback_data(emulator, page)
    assert data[:2] == [f"r:{newest.id}", f"a:{newest.id}"]
    assert data[-1] == f"h:{user['id']}:2"

    # Sent again by Telegram's file id: no upload.
    emulator.press(page, user, f"r:{newest.id}")
    again = emulator.wait_for(
        "sendPhoto", lambda c: c.params.get("photo") == newest.result_file_ids[0], 30
    )
    assert again.files == {}

    # Another user cannot turn someone's pages.
    other = emulator.user(next(_fresh_ids), "Nosy")
    refused = emulator.press(page, other, f"h:{user['id']}:2")
    assert emulator.wait_for_answer(refused).params["text"] == text("en", "button.not_yours")
    emulator.press(page, user, f"h:{user['id']}:2")
    turned = emulator.wait_for(
        "editMessageText", lambda c: c.params.get("message_id") == page["message_id"], 30
    )
    assert "diya number 0" in turned.params["text"]

    asked = emulator.send_text(chat, user, "/privacy")
    told = emulator.wait_for("sendMessage", answer_to(asked), 30).params["text"]
    assert told == text(
        "en",
        "privacy.text",
        daily_quota=20,
        retention_days="30",
        input_rule=text("en", "privacy.input_after", hours="24"),
    )
    assert "for 30 days" in told and "24 hours after its last use" in told

    asked = emulator.send_text(chat, user, "/export")
    sent = emulator.wait_for("sendDocument", answer_to(asked), timeout=60)
    with zipfile.ZipFile(io.BytesIO(sent.files["document"])) as archive:
        names = set(archive.namelist())
        exported = json.loads(archive.read("jobs.json"))
        assert archive.read("README.txt").decode() == text("en", "export.readme")
    assert {"profile.json", "jobs.json", "ledger.json"} <= names
    assert sorted(job["id"] for job in exported) == sorted(job.id for job in made)
    for job in made:
        assert f"results/{job.result_paths[0]}" in names or job.result_paths[0] in names

    asked = emulator.send_text(chat, user, "/forget")
    confirm = emulator.wait_for("sendMessage", answer_to(asked), 30).result
    emulator.press(confirm, user, f"f:{user['id']}:y")
    done = emulator.wait_for(
        "editMessageText", lambda c: c.params.get("message_id") == confirm["message_id"], 30
    )
    assert done.params["text"] == text("en", "forget.done", jobs=6, files=6)
    assert jobs_in_chat(database_url, chat["id"]) == []
    for job in made:
        assert not (
            Path(database_url.removeprefix("sqlite:///")).parent / job.result_paths[0]
        ).exists()
    asked = emulator.send_text(chat, user, "/history")
    assert emulator.wait_for("sendMessage", answer_to(asked), 30).params["text"] == text(
        "en", "history.empty"
    )


def test_a_photo_captioned_portrait_is_told_it_is_not_used(stack: Stack) -> None:
    """/portrait is made from words alone: a photo sent with it was dropped unsaid in a
    private chat (the bot praised the photo instead) and got no answer at all in a group."""
    emulator, database_url = stack
    user, chat = new_user(emulator)
    group = emulator.group_chat(-260_000 - next(_fresh_ids))
    for where, caption in [
        (chat, "/portrait a cat in this style"),
        (group, f"/portrait@{emulator.username} a cat in this style"),
    ]:
        sent = emulator.send_photo(where, user, encoded(selfie()), caption=caption)
        told = emulator.wait_for("sendMessage", answer_to(sent), 60)
        assert told.params["text"] == text("en", "photo.portrait_takes_no_photo")
        assert jobs_in_chat(database_url, where["id"]) == []
