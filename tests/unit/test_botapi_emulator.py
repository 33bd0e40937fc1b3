"""The Bot API emulator as python-telegram-bot sees it: users' photos and documents, inline
keyboards and callback queries, documents from the bot, chat administrators, albums."""

from __future__ import annotations

import io
import time
from collections.abc import AsyncIterator

import pytest
from PIL import Image
from telegram import (
    Bot,
    ChatMemberAdministrator,
    ChatMemberMember,
    ChatMemberOwner,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputMediaPhoto,
    Message,
    ReplyParameters,
    Update,
)
from telegram.error import BadRequest, Forbidden

from tests.support.botapi import DOWNLOAD_LIMIT, ApiError, BotApiEmulator


def png(width: int, height: int, color: str = "orange") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG")
    return out.getvalue()


def keyboard(*data: str) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([[InlineKeyboardButton(d.title(), callback_data=d) for d in data]])


@pytest.fixture
async def bot(emulator: BotApiEmulator) -> AsyncIterator[Bot]:
    async with Bot(
        emulator.token, base_url=emulator.base_url, base_file_url=emulator.base_file_url
    ) as bot:
        yield bot


async def updates(bot: Bot) -> list[Update]:
    """The pending updates, confirmed so that the next call sees only newer ones."""
    got = await bot.get_updates(timeout=0)
    if got:
        await bot.get_updates(offset=got[-1].update_id + 1, timeout=0)
    return list(got)


async def download(bot: Bot, file_id: str) -> bytes:
    file = await bot.get_file(file_id)
    return bytes(await file.download_as_bytearray())


async def test_a_users_photo_comes_in_several_sizes_the_largest_as_sent(
    emulator: BotApiEmulator, bot: Bot
) -> None:
    user = emulator.user(601)
    chat = emulator.private_chat(user)
    data = png(1000, 600)
    sent = emulator.send_photo(chat, user, data, caption="/upscale 2x")

    [update] = await updates(bot)
    message = update.message
    assert message is not None and message.message_id == sent["message_id"]
    assert message.from_user is not None and message.from_user.id == 601
    sizes = message.photo
    assert [(p.width, p.height) for p in sizes] == [(90, 54), (320, 192), (800, 480), (1000, 600)]
    assert len({p.file_id for p in sizes}) == len({p.file_unique_id for p in sizes}) == 4
    largest = sizes[-1]
    assert largest.file_size == len(data)
    assert await download(bot, largest.file_id) == data
    small = await download(bot, sizes[0].file_id)
    assert Image.open(io.BytesIO(small)).size == (90, 54)
    assert sizes[0].file_size == len(small)
    assert message.caption == "/upscale 2x"
    [entity] = message.caption_entities
    assert (entity.type, entity.offset, entity.length) == ("bot_command", 0, 8)
    assert message.parse_caption_entity(entity) == "/upscale"
    assert message.text is None and not message.entities


async def test_a_small_photo_has_one_size_and_a_plain_caption_no_entities(
    emulator: BotApiEmulator, bot: Bot
) -> None:
    user = emulator.user(602)
    data = png(64, 48)
    emulator.send_photo(emulator.private_chat(user), user, data, caption="make it blue")

    [update] = await updates(bot)
    assert update.message is not None
    [only] = update.message.photo
    assert (only.width, only.height, only.file_size) == (64, 48, len(data))
    assert update.message.caption == "make it blue" and not update.message.caption_entities


async def test_bytes_that_are_no_image_still_come_as_a_photo(
    emulator: BotApiEmulator, bot: Bot
) -> None:
    user = emulator.user(603)
    emulator.send_photo(emulator.private_chat(user), user, b"not an image")

    [update] = await updates(bot)
    assert update.message is not None
    [only] = update.message.photo
    assert (only.width, only.height, only.file_size) == (0, 0, 12)
    assert update.message.caption is None
    assert await download(bot, only.file_id) == b"not an image"


async def test_a_users_document_and_its_download(emulator: BotApiEmulator, bot: Bot) -> None:
    user = emulator.user(604)
    group = emulator.group_chat(-100604)
    data = png(300, 200)
    emulator.send_document(group, user, data, "scan.png", "image/png", caption="/portrait x")

    [update] = await updates(bot)
    message = update.message
    assert message is not None and message.document is not None
    document = message.document
    assert (document.file_name, document.mime_type, document.file_size) == (
        "scan.png",
        "image/png",
        len(data),
    )
    assert message.caption_entities[0].type == "bot_command"
    file = await bot.get_file(document.file_id)
    assert file.file_path is not None and file.file_path.endswith(".png")
    assert await download(bot, document.file_id) == data


async def test_files_over_20_mb_are_reported_but_not_handed_out(
    emulator: BotApiEmulator, bot: Bot
) -> None:
    user = emulator.user(605)
    chat = emulator.private_chat(user)
    big = 25 * 1024 * 1024
    emulator.send_document(chat, user, b"%PDF-1.7", "big.pdf", "application/pdf", declared_size=big)
    emulator.send_photo(chat, user, png(400, 300), declared_size=big)
    emulator.send_document(chat, user, bytes(DOWNLOAD_LIMIT + 1), "real.bin", "application/zip")

    document_update, photo_update, real_update = await updates(bot)
    assert document_update.message is not None and document_update.message.document is not None
    assert document_update.message.document.file_size == big
    assert photo_update.message is not None
    assert photo_update.message.photo[-1].file_size == big
    assert real_update.message is not None and real_update.message.document is not None
    for file_id in (
        document_update.message.document.file_id,
        photo_update.message.photo[-1].file_id,
        real_update.message.document.file_id,
    ):
        with pytest.raises(BadRequest, match=r"(?i)file is too big"):
            await bot.get_file(file_id)
    # The smaller sizes of the big photo are small files, as on Telegram.
    assert await download(bot, photo_update.message.photo[0].file_id)
    refusals = emulator.calls_to("getFile")[:3]
    assert all(isinstance(c.result, ApiError) and c.result.status == 400 for c in refusals)


async def test_a_user_replies_to_the_bots_photo(emulator: BotApiEmulator, bot: Bot) -> None:
    user = emulator.user(606)
    chat = emulator.private_chat(user)
    request = emulator.send_text(chat, user, "/portrait a heron")
    sent = await bot.send_photo(
        chat["id"],
        png(32, 32),
        caption="Seed 1",
        reply_parameters=ReplyParameters(request["message_id"]),
    )
    stored_photo = emulator.messages[(chat["id"], sent.message_id)]
    reply = emulator.send_text(chat, user, "/upscale", reply_to=stored_photo)
    emulator.send_photo(chat, user, png(20, 20), caption="like this", reply_to=reply)

    _, text_update, photo_update = await updates(bot)
    assert text_update.message is not None
    replied = text_update.message.reply_to_message
    assert replied is not None and replied.message_id == sent.message_id
    assert replied.photo[-1].file_id == sent.photo[-1].file_id and replied.caption == "Seed 1"
    # As on Telegram, the message replied to carries no reply of its own.
    assert replied.reply_to_message is None
    assert photo_update.message is not None and photo_update.message.reply_to_message is not None
    assert photo_update.message.reply_to_message.text == "/upscale"


async def test_inline_keyboards_presses_and_answers(emulator: BotApiEmulator, bot: Bot) -> None:
    user = emulator.user(607)
    chat = emulator.private_chat(user)
    sent = await bot.send_message(chat["id"], "Which one?", reply_markup=keyboard("one", "two"))
    record = sent.to_dict()
    assert sent.reply_markup == keyboard("one", "two")
    assert [[b["callback_data"] for b in row] for row in emulator.buttons_of(record)] == [
        ["one", "two"]
    ]

    query_id = emulator.press(record, user, "two")
    [update] = await updates(bot)
    query = update.callback_query
    assert query is not None and query.id == query_id
    assert query.data == "two" and query.from_user.id == 607 and query.chat_instance
    assert isinstance(query.message, Message) and query.message.message_id == sent.message_id
    assert query.message.reply_markup == keyboard("one", "two")

    assert await bot.answer_callback_query(query_id, text="Two it is", show_alert=True)
    answer = emulator.wait_for_answer(query_id, timeout=5)
    assert answer.params["text"] == "Two it is" and answer.params["show_alert"] is True
    with pytest.raises(BadRequest, match=r"(?i)query is too old"):
        await bot.answer_callback_query(query_id)
    assert len(emulator.answers_to(query_id)) == 2

    with pytest.raises(ValueError, match="no button"):
        emulator.press(record, user, "three")


async def test_callback_query_ids_stay_strings_and_answers_can_fail(
    emulator: BotApiEmulator, bot: Bot
) -> None:
    user = emulator.user(608)
    chat = emulator.private_chat(user)
    sent = await bot.send_message(chat["id"], "Go?", reply_markup=keyboard("go"))
    first = emulator.press(sent.to_dict(), user, "go")
    second = emulator.press(sent.to_dict(), user, "go")
    assert first != second and first.isdigit()
    with pytest.raises(BadRequest, match=r"(?i)message_too_long"):
        await bot.answer_callback_query(second, text="x" * 201)
    emulator.fail("answerCallbackQuery")
    with pytest.raises(BadRequest, match=r"(?i)emulated failure"):
        await bot.answer_callback_query(first)
    assert await bot.answer_callback_query(first)
    assert await bot.answer_callback_query(second)
    assert [c.params["callback_query_id"] for c in emulator.answers_to(first)] == [first, first]
    with pytest.raises(BadRequest, match=r"(?i)query id is invalid"):
        await bot.answer_callback_query("12345")


async def test_edits_replace_the_keyboard_and_can_remove_it(
    emulator: BotApiEmulator, bot: Bot
) -> None:
    user = emulator.user(609)
    chat = emulator.private_chat(user)
    sent = await bot.send_message(chat["id"], "Pick", reply_markup=keyboard("a", "b"))
    record = sent.to_dict()

    edited = await bot.edit_message_reply_markup(
        chat["id"], sent.message_id, reply_markup=keyboard("c")
    )
    assert isinstance(edited, Message) and edited.reply_markup == keyboard("c")
    assert [b["callback_data"] for b in emulator.buttons_of(record)[0]] == ["c"]
    with pytest.raises(BadRequest, match=r"(?i)not modified"):
        await bot.edit_message_reply_markup(chat["id"], sent.message_id, reply_markup=keyboard("c"))
    # The same text with another keyboard is a change; then text alone drops the keyboard.
    await bot.edit_message_text("Pick", chat["id"], sent.message_id, reply_markup=keyboard("d"))
    assert emulator.buttons_of(record)[0][0]["callback_data"] == "d"
    await bot.edit_message_text("Picked", chat["id"], sent.message_id)
    assert emulator.buttons_of(record) == []
    with pytest.raises(ValueError, match="no button"):
        emulator.press(record, user, "d")

    too_long = InlineKeyboardMarkup([[InlineKeyboardButton("x", callback_data="x" * 65)]])
    with pytest.raises(BadRequest, match=r"(?i)button_data_invalid"):
        await bot.send_message(chat["id"], "x", reply_markup=too_long)

    photo = await bot.send_photo(chat["id"], png(16, 16), caption="old", reply_markup=keyboard("e"))
    recaptioned = await bot.edit_message_caption(
        chat["id"], photo.message_id, caption="new", reply_markup=keyboard("f")
    )
    assert isinstance(recaptioned, Message) and recaptioned.caption == "new"
    assert emulator.buttons_of(photo.to_dict())[0][0]["callback_data"] == "f"
    with pytest.raises(BadRequest, match=r"(?i)no text in the message"):
        await bot.edit_message_text("text", chat["id"], photo.message_id)
    with pytest.raises(BadRequest, match=r"(?i)no caption in the message"):
        await bot.edit_message_caption(chat["id"], sent.message_id, caption="c")

    mine = emulator.send_text(chat, user, "hello")
    with pytest.raises(BadRequest, match=r"(?i)can't be edited"):
        await bot.edit_message_text("bye", chat["id"], mine["message_id"])


async def test_the_bot_sends_a_document(emulator: BotApiEmulator, bot: Bot) -> None:
    user = emulator.user(610)
    chat = emulator.private_chat(user)
    request = emulator.send_text(chat, user, "/export")
    data = b"seed,steps\n7,4\n"
    sent = await bot.send_document(
        chat["id"],
        data,
        filename="jobs.csv",
        caption="Your jobs",
        reply_parameters=ReplyParameters(request["message_id"]),
        reply_markup=keyboard("again"),
    )
    document = sent.document
    assert document is not None
    assert (document.file_name, document.mime_type, document.file_size) == (
        "jobs.csv",
        "text/csv",
        len(data),
    )
    assert sent.caption == "Your jobs" and sent.reply_markup == keyboard("again")
    assert sent.reply_to_message is not None
    assert sent.reply_to_message.message_id == request["message_id"]
    call = emulator.wait_for("sendDocument", timeout=5)
    assert call.files["document"] == data
    assert await download(bot, document.file_id) == data

    again = await bot.send_document(chat["id"], document.file_id)
    assert again.document is not None and again.document.file_id == document.file_id
    with pytest.raises(BadRequest, match=r"(?i)caption is too long"):
        await bot.send_document(chat["id"], data, filename="x.csv", caption="c" * 1025)
    with pytest.raises(BadRequest, match=r"(?i)non-empty"):
        await bot.send_document(chat["id"], b"", filename="empty.txt")


async def test_chat_members_and_administrators(emulator: BotApiEmulator, bot: Bot) -> None:
    owner, admin, member = emulator.user(611, "Meera"), emulator.user(612), emulator.user(613)
    group = emulator.group_chat(-100611)
    emulator.set_admins(group["id"], [admin["id"], owner["id"]], creator=owner["id"])

    as_owner = await bot.get_chat_member(group["id"], owner["id"])
    assert isinstance(as_owner, ChatMemberOwner) and as_owner.user.first_name == "Meera"
    assert as_owner.is_anonymous is False
    as_admin = await bot.get_chat_member(group["id"], admin["id"])
    assert isinstance(as_admin, ChatMemberAdministrator) and as_admin.can_delete_messages
    as_member = await bot.get_chat_member(group["id"], member["id"])
    assert isinstance(as_member, ChatMemberMember) and as_member.user.id == 613
    stranger = await bot.get_chat_member(group["id"], 999)
    assert isinstance(stranger, ChatMemberMember) and stranger.user.id == 999
    admins = await bot.get_chat_administrators(group["id"])
    assert [(type(a), a.user.id) for a in admins] == [
        (ChatMemberOwner, 611),
        (ChatMemberAdministrator, 612),
    ]
    with pytest.raises(BadRequest, match=r"(?i)private chat"):
        await bot.get_chat_administrators(owner["id"])

    emulator.set_admins(group["id"], [])
    assert isinstance(await bot.get_chat_member(group["id"], owner["id"]), ChatMemberMember)


async def test_an_album_keeps_each_caption_and_its_group_id(
    emulator: BotApiEmulator, bot: Bot
) -> None:
    user = emulator.user(614)
    chat = emulator.private_chat(user)
    album = await bot.send_media_group(
        chat["id"],
        [
            InputMediaPhoto(png(8, 8), caption="Seed 1"),
            InputMediaPhoto(png(8, 8), caption="Seed 2"),
        ],
    )
    assert [m.caption for m in album] == ["Seed 1", "Seed 2"]
    group_ids = {m.media_group_id for m in album}
    assert len(group_ids) == 1 and None not in group_ids
    stored = [emulator.messages[(chat["id"], m.message_id)] for m in album]
    assert [(m["caption"], m["media_group_id"]) for m in stored] == [
        ("Seed 1", album[0].media_group_id),
        ("Seed 2", album[0].media_group_id),
    ]


async def test_a_user_album_shares_its_group_id(emulator: BotApiEmulator, bot: Bot) -> None:
    user = emulator.user(615)
    chat = emulator.private_chat(user)
    emulator.send_photo(chat, user, png(8, 8), caption="/portrait", media_group_id="77")
    emulator.send_photo(chat, user, png(9, 9), media_group_id="77")

    first, second = await updates(bot)
    assert first.message is not None and second.message is not None
    assert first.message.media_group_id == second.message.media_group_id == "77"


async def test_a_fault_can_be_kept_to_one_chat(emulator: BotApiEmulator, bot: Bot) -> None:
    blocked = emulator.private_chat(emulator.user(611))
    other = emulator.private_chat(emulator.user(612))
    emulator.fail(
        "sendMessage", 403, "Forbidden: bot was blocked by the user", chat_id=blocked["id"]
    )
    assert await bot.send_message(other["id"], "still fine")
    with pytest.raises(Forbidden, match=r"(?i)blocked"):
        await bot.send_message(blocked["id"], "refused")
    assert await bot.send_message(blocked["id"], "once only")


async def test_a_limited_uplink_takes_an_upload_in_at_its_speed(
    emulator: BotApiEmulator, bot: Bot
) -> None:
    chat = emulator.private_chat(emulator.user(61, "Uma"))
    data = b"x" * 100_000
    emulator.limit_uplink(400_000)  # bytes a second: 0.25 s for the document
    started = time.monotonic()
    await bot.send_document(chat["id"], data, filename="a.bin")
    sent = emulator.wait_for("sendDocument", timeout=5)
    assert sent.at - started >= 0.25
    await bot.send_message(chat["id"], "no upload, no wait")
    assert emulator.wait_for("sendMessage", timeout=5).at - sent.at < 0.2
    emulator.limit_uplink(None)
    started = time.monotonic()
    await bot.send_document(chat["id"], data, filename="b.bin")
    [_, again] = emulator.calls_to("sendDocument", chat["id"])
    assert again.at - started < 0.2
