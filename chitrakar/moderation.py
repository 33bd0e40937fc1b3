"""Admin and moderation actions from any chat channel. Each asks `chitrakar.permissions`
first, and each is written to the audit log: done or refused, who, whom, what and why.

Blocking (database, files) calls; channels run them in a thread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from chitrakar.artifacts import ArtifactStore
from chitrakar.config import Settings
from chitrakar.domain import CommandError
from chitrakar.permissions import Permission, Role, may, role_of
from chitrakar.quota import group_account, next_reset, quota_day, user_account
from db import audit, jobs, ledger, retention, stats
from db.audit import AuditEntry, ChatSettingsView, OpenedReport, ReportView
from db.jobs import JobView
from db.session import Store
from db.stats import QueueEntry, Stats

log = logging.getLogger(__name__)

PAUSED_FLAG = "paused"
# The most credits one /grant or /setquota may give (a typo must not read as "unlimited").
MAX_CREDITS = 100_000
# A /pause notice is sent inside other sentences, within Telegram's 4096 characters a message.
MAX_PAUSE_NOTICE_CHARS = 1000


class NotAllowed(CommandError):
    """A command the user's role does not permit (recorded in the audit log)."""


@dataclass(frozen=True)
class Actor:
    """Who acts, where: their id, role and chat."""

    channel: str
    user_id: str
    role: Role
    chat_id: int


@dataclass(frozen=True)
class Review:
    """What a decision on a report did, for the channel to finish (delete messages)."""

    report: ReportView
    job: JobView | None
    delete_messages: list[int]


class Moderation:
    def __init__(self, settings: Settings, store: Store, artifacts: ArtifactStore) -> None:
        self._settings = settings
        self._store = store
        self._artifacts = artifacts

    def role_of(self, user_id: str, is_group_admin: bool) -> Role:
        return role_of(user_id, self._settings.bot_admins, is_group_admin)

    def is_banned(self, channel: str, user_id: str) -> bool:
        with self._store.unit_of_work() as uow:
            return audit.is_banned(uow, channel, user_id)

    def are_banned(self, channel: str, user_ids: Sequence[str]) -> list[bool]:
        """`is_banned` for each user, in one statement."""
        with self._store.unit_of_work() as uow:
            banned = audit.banned_among(uow, channel, set(user_ids))
        return [user_id in banned for user_id in user_ids]

    def paused(self) -> str | None:
        """The message to users while generation is paused; None when it runs."""
        with self._store.unit_of_work() as uow:
            return audit.get_flag(uow, PAUSED_FLAG)

    def check(self, actor: Actor, permission: Permission, action: str) -> None:
        """Raise NotAllowed (and record the refusal) unless the actor may do this."""
        if may(actor.role, permission):
            return
        self._record(actor, action, allowed=False, reason="not permitted for the role")
        raise NotAllowed("admin.not_allowed")

    def _record(
        self,
        actor: Actor,
        action: str,
        *,
        target: str | None = None,
        reason: str | None = None,
        detail: dict[str, object] | None = None,
        allowed: bool = True,
    ) -> None:
        with self._store.unit_of_work() as uow:
            audit.record(
                uow,
                channel=actor.channel,
                actor=actor.user_id,
                actor_role=actor.role,
                action=action,
                target=target,
                chat_id=actor.chat_id,
                reason=reason,
                detail=dict(detail) if detail else None,
                allowed=allowed,
            )

    def ban(self, actor: Actor, target: str, banned: bool, reason: str | None) -> None:
        self.check(actor, Permission.BAN, "ban" if banned else "unban")
        if target in self._settings.bot_admins:
            raise CommandError("admin.cannot_ban_admin")
        with self._store.unit_of_work() as uow:
            audit.set_banned(uow, actor.channel, target, banned)
        cancelled = self._cancel_all(actor.channel, target) if banned else []
        self._record(
            actor,
            "ban" if banned else "unban",
            target=f"user:{target}",
            reason=reason,
            detail={"cancelled_jobs": [job.id for job in cancelled]} if cancelled else None,
        )

    def _cancel_all(self, channel: str, user_id: str) -> list[JobView]:
        """A banned user's queued, held and running jobs stop, refunded."""
        with self._store.unit_of_work() as uow:
            return jobs.cancel_jobs(uow, channel, None, user_id, reason="the user was banned")

    def grant(self, actor: Actor, target: str, credits: int) -> None:
        self.check(actor, Permission.GRANT, "grant")
        _check_credits(credits)
        day = quota_day(datetime.now(UTC), self._settings.zone)
        with self._store.unit_of_work() as uow:
            key = user_account(actor.channel, target)
            ledger.grant(uow.session, key, credits, day, note=f"granted by {actor.user_id}")
            uow.commit()
        self._record(actor, "grant", target=f"user:{target}", detail={"credits": credits})

    def set_quota(self, actor: Actor, target: str, credits: int | None) -> None:
        """A user's own daily credits (None: back to CHITRAKAR_DAILY_QUOTA)."""
        self.check(actor, Permission.SET_QUOTA, "set_quota")
        if credits is not None:
            _check_credits(credits)
        with self._store.unit_of_work() as uow:
            ledger.set_account_limit(uow.session, user_account(actor.channel, target), credits)
            uow.commit()
        self._record(actor, "set_quota", target=f"user:{target}", detail={"credits": credits})

    def stats(self, actor: Actor) -> tuple[Stats, dict[str, int]]:
        """Today's figures (since midnight in CHITRAKAR_TIMEZONE) and audit events by action."""
        self.check(actor, Permission.STATS, "stats")
        now = datetime.now(UTC)
        since = next_reset(now, self._settings.zone) - timedelta(days=1)
        with self._store.unit_of_work() as uow:
            return stats.stats_since(uow, since, now), audit.count_by_action(uow, since)

    def queue(self, actor: Actor) -> list[QueueEntry]:
        self.check(actor, Permission.STATS, "queue")
        with self._store.unit_of_work() as uow:
            return stats.queue_snapshot(uow)

    def audit_log(self, actor: Actor, limit: int = 15) -> list[AuditEntry]:
        self.check(actor, Permission.AUDIT, "audit")
        with self._store.unit_of_work() as uow:
            return audit.latest(uow, limit)

    def pause(self, actor: Actor, message: str | None) -> None:
        # New requests are refused while paused, and held jobs are not handed over; jobs the
        # workers already hold finish.
        """Stop taking new jobs; users are told `message` ("": a default, in their language)."""
        self.check(actor, Permission.PAUSE, "pause" if message is not None else "resume")
        if message is not None and len(message) > MAX_PAUSE_NOTICE_CHARS:
            raise CommandError(
                "admin.pause_too_long", limit=MAX_PAUSE_NOTICE_CHARS, length=len(message)
            )
        with self._store.unit_of_work() as uow:
            audit.set_flag(uow, PAUSED_FLAG, message, actor.user_id)
        self._record(actor, "pause" if message is not None else "resume", reason=message or None)

    def chat_moved(self, channel: str, old_chat_id: int, new_chat_id: int) -> None:
        """Telegram says a group became a supergroup: its settings, credits and jobs follow it."""
        with self._store.unit_of_work() as uow:
            moved_jobs = jobs.move_to_chat(uow, channel, old_chat_id, new_chat_id)
            # Committed with the jobs.
            moved = audit.move_chat(uow, channel, old_chat_id, new_chat_id)
            if not (moved or moved_jobs):
                return  # told twice (once in each chat), or nothing to move
            audit.record(
                uow,
                channel=channel,
                actor="system",
                actor_role="system",
                action="chat_moved",
                target=f"chat:{new_chat_id}",
                chat_id=old_chat_id,
                detail={"jobs": moved_jobs},
            )
        log.info(
            "chat %s became %s: its settings, credits and %d job(s) moved",
            old_chat_id,
            new_chat_id,
            moved_jobs,
        )

    def chat_settings(self, channel: str, chat_id: int) -> ChatSettingsView:
        with self._store.unit_of_work() as uow:
            return audit.chat_settings(uow, channel, chat_id)

    def change_settings(
        self,
        actor: Actor,
        *,
        command: tuple[str, bool] | None = None,
        style: tuple[str, bool] | None = None,
        content_policy: str | audit._Unset | None = audit.UNSET,
        spoilers: bool | None = None,
        group_quota: int | audit._Unset | None = audit.UNSET,
    ) -> ChatSettingsView:
        self.check(actor, Permission.GROUP_SETTINGS, "settings")
        with self._store.unit_of_work() as uow:
            view = audit.update_chat_settings(
                uow,
                actor.channel,
                actor.chat_id,
                command=command,
                style=style,
                content_policy=content_policy,
                spoilers=spoilers,
            )
            if not isinstance(group_quota, audit._Unset):
                key = group_account(actor.channel, actor.chat_id)
                ledger.set_account_limit(uow.session, key, group_quota)
                uow.commit()
        # What changed, each as set: the deployment's policy back is "default", no group
        # limit "off" (a change to None was left out before, and the log showed none).
        detail: dict[str, object] = {}
        if command is not None:
            detail["command"] = _switch_named(command)
        if style is not None:
            detail["style"] = _switch_named(style)
        if not isinstance(content_policy, audit._Unset):
            detail["content_policy"] = content_policy or "default"
        if spoilers is not None:
            detail["spoilers"] = spoilers
        if not isinstance(group_quota, audit._Unset):
            detail["group_quota"] = "off" if group_quota is None else group_quota
        self._record(actor, "settings", target=f"chat:{actor.chat_id}", detail=detail)
        return view

    def set_group_quota(self, actor: Actor, limit: int | None) -> None:
        """`/groupquota`: the group's credits a day (None: no limit), recorded as a change of
        its settings."""
        self.check(actor, Permission.GROUP_QUOTA, "group_quota")
        self.change_settings(actor, group_quota=limit)

    def report(self, actor: Actor, replied_message_id: int) -> tuple[OpenedReport, JobView]:
        """A member flags the result a message carries (a repeat finds their open report,
        `created` False). Raises CommandError when the message carries none."""
        self.check(actor, Permission.REPORT, "report")
        with self._store.unit_of_work() as uow:
            job = jobs.job_for_message(uow, actor.chat_id, replied_message_id)
            opened = audit.open_report(uow, job.id, actor.user_id, actor.chat_id) if job else None
        if job is None or opened is None:
            raise CommandError("report.not_a_result")
        if opened.created:
            self._record(actor, "report", target=f"job:{job.id}", detail={"report": opened.id})
        return opened, job

    def review(self, actor: Actor, report_id: int, decision: str) -> Review | None:
        """A bot admin decides: dismiss, delete the result, or ban its requester. None when
        the report is already decided; CommandError when it is gone (its requester deleted
        their data with /forget, and the report with it)."""
        self.check(actor, Permission.REVIEW, "review")
        if decision == "banned":
            self._refuse_to_ban_an_admin(report_id)
        with self._store.unit_of_work() as uow:
            report = audit.decide_report(uow, report_id, decision, actor.user_id)
            job = jobs.get_job(uow, report.job_id) if report is not None else None
            messages = jobs.result_message_ids(uow, report.job_id) if report is not None else []
            gone = report is None and audit.get_report(uow, report_id) is None
        if gone:
            raise CommandError("report.gone")
        if report is None:
            return None
        delete: list[int] = []
        if job is not None and decision == "deleted":
            try:
                self._artifacts.delete_prefix(f"results/{job.id}/")
            except Exception as exc:
                # The files are still stored (an object store that failed): a report closed
                # as "deleted" would never be decided again.
                log.warning(
                    "report %s: could not delete job %s's results: %s", report_id, job.id, exc
                )
                with self._store.unit_of_work() as uow:
                    audit.reopen_report(uow, report_id, decision)
                raise CommandError("report.delete_failed") from exc
            with self._store.unit_of_work() as uow:
                retention.forget_results(uow, job.id, why=f"report {report_id}")
            delete = messages
        cancelled: list[JobView] = []
        if job is not None and decision == "banned":
            with self._store.unit_of_work() as uow:
                audit.set_banned(uow, job.channel, job.requester, True)
            cancelled = self._cancel_all(job.channel, job.requester)
        detail: dict[str, object] = {
            "report": report_id,
            "requester": job.requester if job else None,
        }
        if cancelled:
            detail["cancelled_jobs"] = [one.id for one in cancelled]
        self._record(actor, f"review_{decision}", target=f"job:{report.job_id}", detail=detail)
        return Review(report=report, job=job, delete_messages=delete)

    def _refuse_to_ban_an_admin(self, report_id: int) -> None:
        """Before the report is closed as "banned": a bot admin's result is not, and the
        report stays open for another decision."""
        with self._store.unit_of_work() as uow:
            report = audit.get_report(uow, report_id)
            job = jobs.get_job(uow, report.job_id) if report is not None else None
        if job is not None and job.requester in self._settings.bot_admins:
            raise CommandError("admin.cannot_ban_admin")


def _switch_named(switch: tuple[str, bool] | None) -> str | None:
    """A command or style switched, as the audit log shows it: "portrait off"."""
    return None if switch is None else f"{switch[0]} {'on' if switch[1] else 'off'}"


def _check_credits(credits: int) -> None:
    if not 0 <= credits <= MAX_CREDITS:
        raise CommandError("admin.credits_range", limit=MAX_CREDITS)
