"""The web chat's handlers: a line typed (with a photo, perhaps) or a button pressed becomes a
call on the same services Telegram's handlers call, and the answer becomes messages in the
chat's record. Blocking calls (database, broker, images); the routes run them in a thread.
Every sentence comes from the text catalogue."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bot.bootstrap import BotServices
from chitrakar import replies
from chitrakar.admin_commands import admin_reply
from chitrakar.buttons import (
    Action,
    ButtonPress,
    InvalidButton,
    forget_buttons,
    parse_button,
    stored_rows,
    style_buttons,
)
from chitrakar.domain import Command, CommandError, option_limits, parse_image_command
from chitrakar.moderation import Actor
from chitrakar.permissions import Permission, Role, may
from chitrakar.photos import prepare_selfie
from chitrakar.services import Accepted
from chitrakar.texts import text
from db import web
from db.jobs import Origin
from db.web import CHANNEL, AccountView

log = logging.getLogger(__name__)

# What the web chat's help calls the bot (Telegram's says @username).
BOT_NAME = "chitrakar"
# The longest line taken (Telegram's own limit for a message).
MAX_LINE_CHARS = 4096
# Commands that only make sense in a Telegram group.
GROUP_COMMANDS = (Command.SETTINGS, Command.GROUP_QUOTA)


@dataclass(frozen=True)
class PressAnswer:
    """What a button press says back at once (Telegram's callback answer), and whether the
    page must be loaded again (the chat was deleted)."""

    notice: str | None = None
    alert: bool = False
    reload: bool = False


def split_command(line: str) -> tuple[str | None, str]:
    """`/portrait@anything a cat` → ("portrait", "a cat"); a line that is no command → None."""
    line = line.strip()
    if not line.startswith("/"):
        return None, line
    head, *rest = line.split(maxsplit=1)  # the name ends at any space or line break
    name = head[1:].partition("@")[0].lower()
    return name, rest[0] if rest else ""


class WebChat:
    def __init__(self, services: BotServices) -> None:
        self._services = services

    # -- who and where ---------------------------------------------------------------

    @staticmethod
    def origin(
        account: AccountView, language: str, message_id: int | None, trigger: str | None = None
    ) -> Origin:
        return Origin(
            channel=CHANNEL,
            chat_id=account.id,
            chat_type="private",
            user_external_id=str(account.id),
            user_display_name=account.name,
            language=language,
            request_message_id=message_id,
            trigger=trigger,
        )

    @staticmethod
    def actor(account: AccountView) -> Actor:
        role = Role.BOT_ADMIN if account.is_admin else Role.MEMBER
        return Actor(channel=CHANNEL, user_id=str(account.id), role=role, chat_id=account.id)

    def _say(
        self,
        account: AccountView,
        words: str,
        reply_to: int | None = None,
        *,
        images: list[dict[str, Any]] | None = None,
        buttons: list[list[list[str]]] | None = None,
        attachment: dict[str, str] | None = None,
    ) -> int:
        """Post the bot's message in the account's chat; its id."""
        with self._services.store.unit_of_work() as uow:
            return web.post(
                uow,
                account.id,
                from_bot=True,
                text=words,
                reply_to=reply_to,
                images=images,
                buttons=buttons,
                attachment=attachment,
            )

    def _banned(self, account: AccountView) -> bool:
        moderation = self._services.moderation
        banned = moderation.is_banned(CHANNEL, str(account.id))
        return not may(self.actor(account).role, Permission.GENERATE, banned=banned)

    # -- a line typed ------------------------------------------------------------------

    def take_line(
        self, account: AccountView, language: str, line: str, photo: bytes | None
    ) -> None:
        """Record what the user sent, then answer it."""
        shown = line.strip()
        if photo is not None:
            shown = f"📷 {shown}".strip()
        with self._services.store.unit_of_work() as uow:
            message_id = web.post(uow, account.id, from_bot=False, text=shown)
        try:
            self._answer_line(account, language, line, photo, message_id)
        except CommandError as exc:
            self._say(account, text(language, exc.key, **exc.params), message_id)
        except Exception:
            log.exception("web chat %s: could not answer %r", account.id, line[:80])
            self._say(account, text(language, "error.unexpected"), message_id)

    def _answer_line(
        self,
        account: AccountView,
        language: str,
        line: str,
        photo: bytes | None,
        message_id: int,
    ) -> None:
        name, args = split_command(line)
        say: Callable[[str], int] = lambda words: self._say(account, words, message_id)  # noqa: E731
        if name is None:
            # The web chat keeps no photo for a later reply: the selfie goes with the command.
            say(text(language, "web.avatar_how" if photo is not None else "web.not_a_command"))
            return
        try:
            command = Command(name)
        except ValueError:
            say(text(language, "web.unknown_command", command=name))
            return
        if command in (Command.START, Command.HELP) or not self._banned(account):
            self._run(command, account, language, args, photo, message_id)
        else:
            say(text(language, "moderation.banned"))

    def _run(
        self,
        command: Command,
        account: AccountView,
        language: str,
        args: str,
        photo: bytes | None,
        message_id: int,
    ) -> None:
        services, settings = self._services, self._services.settings
        origin = self.origin(account, language, message_id)
        say: Callable[[str], int] = lambda words: self._say(account, words, message_id)  # noqa: E731
        if command == Command.START:
            say(text(language, "start.text"))
        elif command == Command.HELP:
            say(text(language, "help.text", bot_username=BOT_NAME, **option_limits()))
        elif command in (Command.PORTRAIT, Command.AVATAR):
            self._generate(command, account, origin, args, photo)
        elif command == Command.STYLES:
            self._styles(account, origin)
        elif command == Command.QUOTA:
            status = services.intake.quota_status(origin)
            say(replies.quota_reply(language, status, settings.timezone))
        elif command == Command.CANCEL:
            cancelled = services.intake.cancel(origin)
            with services.store.unit_of_work() as uow:
                for job in cancelled:
                    if job.status_message_id is not None:
                        web.edit(
                            uow,
                            job.chat_id,
                            job.status_message_id,
                            text=text(job.language, "cancel.status"),
                        )
            say(
                replies.cancel_reply(language, cancelled)
                if cancelled
                else text(language, "cancel.nothing")
            )
        elif command == Command.HISTORY:
            words, rows = self.history_page(account, origin, 1)
            self._say(account, words, message_id, buttons=rows)
        elif command == Command.PRIVACY:
            say(replies.privacy_reply(language, settings))
        elif command == Command.EXPORT:
            self._say(
                account,
                text(language, "web.export_ready"),
                message_id,
                attachment={"href": "/export", "name": f"chitrakar-{account.id}.zip"},
            )
        elif command == Command.FORGET:
            rows = stored_rows(language, forget_buttons(str(account.id)))
            self._say(account, text(language, "forget.confirm"), message_id, buttons=rows)
        elif command in GROUP_COMMANDS:
            say(text(language, "settings.groups_only"))
        elif command == Command.REPORT:
            say(text(language, "web.report_here"))
        else:
            say(self._admin(command, account, language, args))

    def _generate(
        self,
        command: Command,
        account: AccountView,
        origin: Origin,
        args: str,
        photo: bytes | None,
    ) -> None:
        language, intake = origin.language, self._services.intake
        default_steps = self._services.settings.default_steps
        try:
            request = parse_image_command(command, args)
            if command == Command.AVATAR:
                if photo is None:
                    self._say(account, text(language, "web.avatar_how"), origin.request_message_id)
                    return
                selfie = prepare_selfie(photo, self._services.settings.image_size)
                accepted = intake.accept(origin, request, selfie)
            elif photo is not None:
                # As in Telegram: made from the words alone, it would drop the photo unsaid.
                key = "photo.portrait_takes_no_photo"
                self._say(account, text(language, key), origin.request_message_id)
                return
            else:
                accepted = intake.accept(origin, request)
        except CommandError as exc:
            reply = replies.command_error(language, default_steps, command, exc)
            self._say(account, reply, origin.request_message_id)
            return
        self._announce_and_dispatch(account, origin, accepted)

    def _announce_and_dispatch(
        self, account: AccountView, origin: Origin, accepted: Accepted
    ) -> None:
        """A status message (the worker edits it with progress), recorded before the job
        goes to the queue, then the job to the queue. The job goes even when its status
        message cannot be posted or recorded: its result still comes, where the user would
        otherwise be told it failed while it waited, charged, for the reconciler."""
        if accepted.duplicate:
            return
        language, intake = origin.language, self._services.intake
        status: int | None = None
        try:
            status = self._say(
                account,
                text(language, "status.queued", position=accepted.position),
                origin.request_message_id,
            )
            if not intake.attach_status_message(accepted.job_id, status):
                # The job ended meanwhile (cancelled from another tab, say): no worker will
                # look for its status message, so it goes now.
                self._forget_message(account, status)
                return
        except Exception:
            log.exception(
                "web chat %s: job %s goes without a status message", account.id, accepted.job_id
            )
            if status is not None:  # posted, not recorded: no worker would remove it
                self._forget_message(account, status)
            status = None
        if not intake.dispatch(accepted):
            failure = text(language, "error.queue_unavailable")
            if status is None:
                self._say(account, failure, origin.request_message_id)
                return
            with self._services.store.unit_of_work() as uow:
                web.edit(uow, account.id, status, text=failure)

    def _forget_message(self, account: AccountView, message_id: int) -> None:
        try:
            with self._services.store.unit_of_work() as uow:
                web.edit(uow, account.id, message_id, deleted=True)
        except Exception:
            log.exception("web chat %s: message %s left behind", account.id, message_id)

    def _styles(self, account: AccountView, origin: Origin) -> None:
        language, intake = origin.language, self._services.intake
        catalogue = intake.catalogue
        rows = stored_rows(language, style_buttons(catalogue, language))
        grid = intake.media.grid_path(self._services.settings.model_label, catalogue)
        if grid.is_file():
            self._say(
                account,
                text(language, "styles.grid_caption"),
                origin.request_message_id,
                images=[{"grid": grid.name}],
                buttons=rows,
            )
            return
        listing = replies.styles_listing(language, catalogue, MAX_LINE_CHARS)
        self._say(account, listing, origin.request_message_id, buttons=rows)
        accepted = intake.request_previews(origin)
        if accepted is not None and not accepted.duplicate:
            self._say(account, text(language, "styles.previews_coming"), origin.request_message_id)
            self._announce_and_dispatch(account, origin, accepted)

    def history_page(
        self, account: AccountView, origin: Origin, page: int
    ) -> tuple[str, list[list[list[str]]]]:
        settings = self._services.settings
        past, pages = self._services.intake.history(origin, page)
        words, rows = replies.history_reply(
            origin.language, past, page, pages, settings.zone, str(account.id)
        )
        return words, stored_rows(origin.language, rows) if rows else []

    def _admin(self, command: Command, account: AccountView, language: str, args: str) -> str:
        """A bot admin's command (a refusal for others, recorded in the audit log)."""
        target, rest = replies.admin_target(args.split())
        return admin_reply(
            command,
            self.actor(account),
            language,
            target,
            rest,
            args,
            moderation=self._services.moderation,
            intake=self._services.intake,
            settings=self._services.settings,
        )

    # -- a button pressed ----------------------------------------------------------------

    def press(
        self,
        account: AccountView,
        language: str,
        data: str,
        under: int | None,
        press_id: str | None,
        answer_as_message: bool = False,
    ) -> PressAnswer:
        """A press of a button under message `under`. `press_id` is the page's own id for
        this press: a press sent twice (a double tap, a retry) makes one job. A page with no
        script shows no pop-up: with `answer_as_message`, the answer is posted in the chat."""
        answer = self._answer_press(account, language, data, under, press_id)
        if answer_as_message and answer.notice:
            self._say(account, answer.notice, under)
        return answer

    def _answer_press(
        self,
        account: AccountView,
        language: str,
        data: str,
        under: int | None,
        press_id: str | None,
    ) -> PressAnswer:
        try:
            press = parse_button(data)
        except InvalidButton:
            log.info("unknown button data %r from web account %s", data, account.id)
            return PressAnswer(text(language, "button.invalid"), alert=True)
        try:
            if self._banned(account):
                return PressAnswer(text(language, "moderation.banned"), alert=True)
            trigger = f"button:{press_id or uuid.uuid4().hex}"
            origin = self.origin(account, language, under, trigger)
            return self._press(account, origin, press, under)
        except CommandError as exc:  # a refused press, or credits short
            return PressAnswer(text(language, exc.key, **exc.params), alert=True)
        except Exception:
            log.exception("web chat %s: could not answer the press %r", account.id, data)
            return PressAnswer(text(language, "error.unexpected"), alert=True)

    def _press(
        self, account: AccountView, origin: Origin, press: ButtonPress, under: int | None
    ) -> PressAnswer:
        language, intake = origin.language, self._services.intake
        if press.action in (Action.HISTORY, Action.FORGET):
            if press.owner != str(account.id):
                return PressAnswer(text(language, "button.not_yours"), alert=True)
            if press.action == Action.HISTORY:
                assert press.page is not None
                words, rows = self.history_page(account, origin, press.page)
                if under is not None:
                    with self._services.store.unit_of_work() as uow:
                        web.edit(uow, account.id, under, text=words, buttons=rows)
                return PressAnswer()
            if not press.confirm:
                return PressAnswer(text(language, "forget.kept"))
            report = self._services.privacy.forget(CHANNEL, press.owner)
            files = report.artifacts + report.inputs
            self._say(account, text(language, "forget.done", jobs=report.jobs, files=files))
            return PressAnswer(reload=True)
        if press.action == Action.STYLE:
            assert press.style is not None
            style = intake.set_default_style(origin, press.style)
            if style is None:
                return PressAnswer(text(language, "button.style_unknown"), alert=True)
            return PressAnswer(text(language, "button.style_set", name=style.name_in(language)))
        if press.action in (Action.SETTING, Action.REVIEW):
            # Group settings and report cards exist in Telegram only.
            return PressAnswer(text(language, "button.invalid"), alert=True)
        if press.action == Action.PICK:
            assert press.index is not None
            job, _ = intake.result_to_pick(origin, press, False)
            caption = text(
                language,
                "button.pick_caption",
                width=job.plan.width,
                height=job.plan.height,
                seed=job.plan.seeds[press.index],
            )
            name = f"chitrakar-{job.id}-{press.index + 1}.png"
            href = f"/images/{job.id}/{press.index}?download=1"
            self._say(account, caption, under, attachment={"href": href, "name": name})
            return PressAnswer()
        if press.action == Action.RESEND:
            job = intake.to_resend(origin, press, False)
            shown = []
            for ref in job.result_file_ids:
                job_id, _, index = ref.partition("/")
                if job_id.isdecimal() and index.isdecimal():
                    shown.append({"job": int(job_id), "index": int(index)})
            self._say(account, "", under, images=shown)
            return PressAnswer()
        accepted = intake.accept_press(origin, press, False)
        if accepted.duplicate:
            return PressAnswer()
        self._announce_and_dispatch(account, origin, accepted)
        return PressAnswer(text(language, "button.queued", position=max(accepted.position, 1)))
