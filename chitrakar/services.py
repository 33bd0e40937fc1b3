"""Taking in a request from any chat channel: record the job, then hand it to the queue.

Blocking (database, broker) calls; channels run them in a thread.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, date, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from chitrakar.artifacts import ArtifactMissing, ArtifactStore
from chitrakar.buttons import Action, ButtonPress, ButtonRefused, may_press, offered_actions
from chitrakar.config import Settings
from chitrakar.domain import (
    Command,
    CommandError,
    GenerationPlan,
    ImageRequest,
    JobKind,
    JobStatus,
    was_abandoned,
)
from chitrakar.media import MediaStore
from chitrakar.moderation import PAUSED_FLAG
from chitrakar.planning import Defaults, choose_style, plan_followup, plan_request
from chitrakar.presets import PresetError, load_presets
from chitrakar.quota import (
    Account,
    QuotaExceeded,
    group_account,
    job_cost,
    next_reset,
    quota_day,
    user_account,
)
from chitrakar.safety import PromptBlocked, PromptPolicy
from chitrakar.styles import Style, StyleCatalogue
from db import audit, heartbeats, jobs, ledger
from db.jobs import JobView, Origin
from db.session import Store, UnitOfWork

log = logging.getLogger(__name__)

# Past jobs on one page of /history (each with two buttons, so a phone shows them all).
HISTORY_PAGE_SIZE = 5


def _steps_the_workers_fix(settings: Settings) -> int | None:
    """The steps a few-step preset runs for every job, where the bot can tell
    (PresetCatalogue.fixed_steps). A presets file that cannot be read stops the workers, not
    the bot: it is logged here."""
    try:
        catalogue = load_presets(settings.presets_file)
    except PresetError as exc:
        log.warning("jobs are charged for the steps they ask for: %s", exc)
        return None
    return catalogue.fixed_steps(settings.preset, settings.model)


def _replace_lost_input(uow: UnitOfWork, job: JobView, input_path: str) -> bool:
    """Point a queued job whose input file is gone at `input_path`, the same request's
    input saved again; commits. False (nothing written) when its input is there, or it is
    no longer queued: the caller deletes the new file."""
    lost = job.input_path
    if job.status != JobStatus.QUEUED or lost is None or Path(lost).exists():
        return False
    if not jobs.replace_queued_input(uow, job.id, lost, input_path):
        return False
    log.info("job %s had lost its input %s; it takes %s", job.id, lost, input_path)
    return True


@dataclass(frozen=True)
class QuotaStatus:
    user_left: int
    user_limit: int
    group_left: int | None
    group_limit: int | None
    resets_at: datetime
    # The steps every image takes under the workers' few-step preset (None: as asked).
    fixed_steps: int | None = None


@dataclass(frozen=True)
class Standing:
    """What the database says about a request before it is taken in, read together."""

    paused: str | None  # the admins' notice while generation is paused
    chat: audit.ChatSettingsView
    default_style: str | None  # the user's, from /styles
    accounts: tuple[Account, ...]  # who pays


@dataclass(frozen=True)
class _Planned:
    """A request that passed its checks, planned and priced: what taking it in writes."""

    origin: Origin
    kind: JobKind
    plan: GenerationPlan
    options: dict[str, Any]
    charge: jobs.Charge

    def take_in(
        self,
        uow: UnitOfWork,
        hand_over_limit: int,
        *,
        input_path: str | None = None,
        commit: bool = True,
    ) -> jobs.TakenIn:
        return jobs.take_in(
            uow,
            self.origin,
            self.kind,
            self.plan,
            options=self.options,
            input_path=input_path,
            charge=self.charge,
            hand_over_limit=hand_over_limit,
            commit=commit,
        )


@dataclass(frozen=True)
class Accepted:
    job_id: int
    position: int
    # The request had already made this job (its update came twice): it has been answered.
    duplicate: bool = False
    # Marked handed over when taken in: `dispatch` publishes it. Otherwise it is held (its
    # user has their share of jobs in flight) and handed over when one of those ends.
    handed_over: bool = False


class JobIntake:
    """Every way a job comes in: a command, a selfie, a button under a result, /styles."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        publish: Callable[[int], None],
        catalogue: StyleCatalogue,
        media: MediaStore,
        artifacts: ArtifactStore,
        prompt_policy: PromptPolicy | None = None,
        publish_many: Callable[[Sequence[int]], None] | None = None,
    ) -> None:
        """`publish` hands one job to the broker, retrying on a lost connection;
        `publish_many` several in one round trip, once (by default, `publish` each)."""
        self._settings = settings
        self._store = store
        self._publish = publish
        self._publish_many = publish_many or partial(_publish_each, publish)
        self._rng = random.SystemRandom()
        self.catalogue = catalogue
        self.media = media
        self.artifacts = artifacts
        self._prompt_policy = prompt_policy or PromptPolicy.load(settings.blocklist_file)
        self._fixed_steps = _steps_the_workers_fix(settings)

    @property
    def _defaults(self) -> Defaults:
        return Defaults(
            base_size=self._settings.image_size,
            steps=self._settings.default_steps,
            guidance_scale=self._settings.guidance_scale,
        )

    def accept(
        self,
        origin: Origin,
        request: ImageRequest,
        selfie: Image.Image | None = None,
        asked_before: bool = False,
    ) -> Accepted:
        """Plan the request (CommandError for a style the catalogue lacks), then write the
        job row (the source of truth) before anything is published. `asked_before`: the
        caller asked for this request already and heard nothing back (an error other than a
        refusal), so a job it finds for the request, waiting and unanswered, is its own to
        answer (domain.was_abandoned)."""
        return self._accept(origin, request, selfie, self._standing(origin), asked_before)

    def accept_many(
        self, requests: Sequence[tuple[Origin, ImageRequest]], asked_before: bool = False
    ) -> list[Accepted | Exception]:
        """`accept` for requests without a selfie that arrived together: what their checks
        read in one transaction, then all of them taken in in one more, with one commit.
        When one fails there (its message came twice, its quota is short), that transaction
        is rolled back and each is taken in again in its own, as `accept` does, so that one
        refused request costs no other its place. One outcome per request: what `accept`
        returns, or what it raises."""
        with self._store.unit_of_work() as uow:
            standings = self._standings(uow, [origin for origin, _ in requests])
        planned: list[_Planned] = []
        refused: dict[int, Exception] = {}
        checked = enumerate(zip(requests, standings, strict=True))
        for index, ((origin, request), standing) in checked:
            try:
                planned.append(self._planned(origin, request, None, standing))
            except Exception as exc:  # raised in that request's caller alone
                refused[index] = exc
        recorded = iter(self._record_together(planned, asked_before))
        return [
            refused[index] if index in refused else next(recorded) for index in range(len(requests))
        ]

    def _record_together(
        self, planned: Sequence[_Planned], asked_before: bool
    ) -> list[Accepted | Exception]:
        """Each planned request taken in: all in one transaction, with one commit where each
        alone is one each (on SQLite, a write to disk each); each in its own when one of
        them fails there. On PostgreSQL the transaction first locks every user and account
        its requests will lock, in key order (`jobs.lock_for_taking_in`): two batches at
        once, in threads or bot processes, then never wait on each other in a cycle."""
        if len(planned) > 1:
            limit = self._settings.max_jobs_in_flight
            with self._store.unit_of_work() as uow:
                try:
                    jobs.lock_for_taking_in(
                        uow, [one.origin for one in planned], [one.charge for one in planned]
                    )
                    taken = [one.take_in(uow, limit, commit=False) for one in planned]
                except Exception as exc:  # rolled back on leaving the block
                    failure = type(exc).__name__
                    log.info("%d requests taken in one by one: %s", len(planned), failure)
                else:
                    # A commit that fails is every caller's failure: whether it was written
                    # cannot be known, and taking them in again could find them written.
                    uow.commit()
                    return [
                        self._accepted(one.origin, each)
                        for one, each in zip(planned, taken, strict=True)
                    ]
        outcomes: list[Accepted | Exception] = []
        for one in planned:
            try:
                outcomes.append(self._record(one.origin, one.take_in, asked_before=asked_before))
            except Exception as refused:  # raised in that request's caller alone
                outcomes.append(refused)
        return outcomes

    def _accept(
        self,
        origin: Origin,
        request: ImageRequest,
        selfie: Image.Image | None,
        standing: Standing,
        asked_before: bool,
    ) -> Accepted:
        planned = self._planned(origin, request, selfie, standing)
        input_path = self.media.save_input(selfie) if selfie is not None else None
        kept = False

        def on_duplicate(uow: UnitOfWork, job: JobView) -> None:
            nonlocal kept
            # The first asking failed after writing the job, and deleted its selfie: the
            # job takes this one instead, or its worker would find no input.
            if asked_before and input_path is not None:
                kept = _replace_lost_input(uow, job, input_path)
            if not kept:
                self.media.forget_input(input_path)

        try:
            return self._record(
                origin,
                partial(planned.take_in, input_path=input_path),
                on_duplicate=on_duplicate,
                asked_before=asked_before,
            )
        except Exception:
            # No job refers to the selfie (unless one took it): it must not stay on disk.
            if not kept:
                self.media.forget_input(input_path)
            raise

    def _planned(
        self,
        origin: Origin,
        request: ImageRequest,
        selfie: Image.Image | None,
        standing: Standing,
    ) -> _Planned:
        """The request checked (raising its refusal) and planned, ready to be taken in."""
        kind = JobKind.AVATAR if request.command == Command.AVATAR else JobKind.PORTRAIT
        if (kind == JobKind.AVATAR) != (selfie is not None):
            raise ValueError("an avatar needs a selfie, and only an avatar takes one")
        # The prompt only: "--no nudity" asks for less, not more.
        self._admit(origin, standing, request.command, request.prompt)
        # The user's own default, switched off in this chat, is left aside here, as one the
        # deployment removed is (they did not ask for it in this request).
        default = standing.default_style
        if default in standing.chat.disabled_styles:
            default = None
        style = choose_style(request, self.catalogue, default)
        self._admit_style(origin, standing, style.key if style else None)
        plan = plan_request(
            request,
            style,
            avatar_prompt=self.catalogue.defaults.avatar_prompt,
            defaults=self._defaults,
            rng=self._rng,
        )
        return _Planned(
            origin=origin,
            kind=kind,
            plan=plan,
            options={k: v for k, v in asdict(request.options).items() if v is not None},
            charge=self._charge(standing, kind, plan),
        )

    def _standing(self, origin: Origin) -> Standing:
        """One transaction for what the checks before taking a request in read."""
        with self._store.unit_of_work() as uow:
            return self._standings(uow, [origin])[0]

    def _standings(self, uow: UnitOfWork, origins: Sequence[Origin]) -> list[Standing]:
        """What the checks before taking these requests in read: one statement for each
        kind of thing, however many requests."""
        paused = audit.get_flag(uow, PAUSED_FLAG)
        chats: dict[tuple[str, int], audit.ChatSettingsView] = {}
        styles: dict[tuple[str, str], str] = {}
        for channel in {origin.channel for origin in origins}:
            of_channel = [origin for origin in origins if origin.channel == channel]
            found = audit.settings_of_chats(uow, channel, {one.chat_id for one in of_channel})
            chats.update(((channel, chat_id), view) for chat_id, view in found.items())
            users = {one.user_external_id for one in of_channel}
            chosen = jobs.default_styles_of(uow, channel, users)
            styles.update(((channel, user), style) for user, style in chosen.items())
        limits = ledger.account_limits(
            uow.connection, {key for origin in origins for key in _account_keys(origin)}
        )
        return [
            Standing(
                paused=paused,
                chat=chats[(origin.channel, origin.chat_id)],
                default_style=styles.get((origin.channel, origin.user_external_id)),
                accounts=self._accounts_with(origin, limits),
            )
            for origin in origins
        ]

    def _admit(self, origin: Origin, standing: Standing, command: Command, words: str = "") -> None:
        """What stops a request before anything else: generation paused by an admin, the
        command switched off in this group, or words the block lists refuse (recorded)."""
        if standing.paused == "":  # a bare /pause: told in the user's own language
            raise CommandError("service.paused_default")
        if standing.paused is not None:
            raise CommandError("service.paused", notice=standing.paused)
        if command in standing.chat.disabled_commands:
            raise CommandError("settings.command_off", command=command)
        verdict = self._prompt_policy.check(words) if words else None
        if verdict is not None and verdict.blocked:
            with self._store.unit_of_work() as uow:
                audit.record(
                    uow,
                    channel=origin.channel,
                    actor="system",
                    actor_role="system",
                    action="prompt_blocked",
                    target=f"user:{origin.user_external_id}",
                    chat_id=origin.chat_id,
                    reason=verdict.category,
                    detail={"term": verdict.term},
                )
            raise PromptBlocked(verdict)

    def _admit_style(self, origin: Origin, standing: Standing, style_key: str | None) -> None:
        if style_key is not None and style_key in standing.chat.disabled_styles:
            style = self.catalogue.get(style_key)
            name = style.name_in(origin.language) if style else style_key
            raise CommandError("settings.style_off", style=name)

    def find_job(self, job_id: int) -> JobView | None:
        with self._store.unit_of_work() as uow:
            return jobs.get_job(uow, job_id)

    def result_to_pick(
        self, origin: Origin, press: ButtonPress, presser_is_admin: bool
    ) -> tuple[JobView, bytes]:
        """The job and the PNG a Pick button asks for. Raises ButtonRefused."""
        parent = self._pressable(origin, press, presser_is_admin)
        assert press.index is not None
        if Action.PICK not in offered_actions(parent.kind, len(parent.plan.seeds)):
            raise ButtonRefused("button.stale")
        key, checksum = self._result_of(parent, press.index)
        try:
            return parent, self.artifacts.get(key, checksum)
        except ArtifactMissing:
            raise ButtonRefused("button.result_gone") from None

    def accept_press(
        self,
        origin: Origin,
        press: ButtonPress,
        presser_is_admin: bool,
        asked_before: bool = False,
    ) -> Accepted:
        """A job from a button under a result: Again, a variation or an upscale. The press's
        own id (in the origin's trigger) makes a repeated callback find the same job;
        `asked_before` as for `accept`."""
        parent = self._pressable(origin, press, presser_is_admin)
        standing = self._standing(origin)
        # What the group's admins switched off since applies to presses too.
        command = Command.AVATAR if parent.kind == JobKind.AVATAR else Command.PORTRAIT
        self._admit(origin, standing, command)
        self._admit_style(origin, standing, parent.plan.style)
        kind, plan = plan_followup(parent.kind, parent.plan, press, self._rng)
        input_path: str | None = None
        start_job: int | None = parent.id
        start_index = press.index
        if press.action != Action.AGAIN:
            # The worker reads the parent's result from the artifact store by parent and index.
            assert press.index is not None
            self._require_result(parent, press.index)
        elif parent.kind == JobKind.AVATAR:
            # Again on avatars starts from the same selfie, while it is kept.
            input_path = parent.input_path
            if input_path is None or not Path(input_path).exists():
                raise ButtonRefused("button.input_gone")
        elif parent.kind == JobKind.VARIATION:
            # Again on variations varies the same image once more.
            start_job, start_index = parent.parent_job_id, parent.parent_index
            source = self.find_job(start_job) if start_job is not None else None
            if source is None or start_index is None:
                raise ButtonRefused("button.result_gone")
            self._require_result(source, start_index)
        charge = self._charge(standing, kind, plan)
        return self._record(
            origin,
            lambda uow, limit: jobs.take_in(
                uow,
                origin,
                kind,
                plan,
                input_path=input_path,
                parent_job_id=start_job,
                parent_index=start_index,
                charge=charge,
                hand_over_limit=limit,
            ),
            asked_before=asked_before,
        )

    def _require_result(self, job: JobView, index: int) -> None:
        key, _ = self._result_of(job, index)
        if not self.artifacts.exists(key):
            raise ButtonRefused("button.result_gone")

    def accounts_of(self, origin: Origin) -> tuple[Account, ...]:
        with self._store.unit_of_work() as uow:
            return self._accounts(uow, origin)

    def _accounts(self, uow: UnitOfWork, origin: Origin) -> tuple[Account, ...]:
        limits = ledger.account_limits(uow.connection, _account_keys(origin))
        return self._accounts_with(origin, limits)

    def _accounts_with(self, origin: Origin, limits: Mapping[str, int]) -> tuple[Account, ...]:
        """Who pays for a request: the user, and in a group with a quota, the group too.
        `limits`: the limits set on accounts (any without one is left out)."""
        user_key, *group_keys = _account_keys(origin)
        # A bot admin may have set this user's own daily credits (/setquota).
        accounts = [Account(user_key, limits.get(user_key, self._settings.daily_quota))]
        accounts += [Account(key, limits.get(key)) for key in group_keys]
        return tuple(accounts)

    def quota_day(self) -> date:
        return quota_day(datetime.now(UTC), self._settings.zone)

    def _as_run(self, plan: GenerationPlan) -> GenerationPlan:
        # A few-step preset runs its own steps, whatever the job asked for: those are paid.
        return plan if self._fixed_steps is None else replace(plan, steps=self._fixed_steps)

    def _charge(self, standing: Standing, kind: JobKind, plan: GenerationPlan) -> jobs.Charge:
        return jobs.Charge(
            accounts=standing.accounts,
            cost=job_cost(kind, self._as_run(plan), self._settings.image_size),
            day=self.quota_day(),
        )

    def quota_status(self, origin: Origin) -> QuotaStatus:
        """What /quota shows: credits left today for the user (and the group), and when the
        day turns."""
        now = datetime.now(UTC)
        day = quota_day(now, self._settings.zone)
        accounts = self.accounts_of(origin)
        with self._store.unit_of_work() as uow:
            left = [ledger.balance(uow.session, account, day) for account in accounts]
        # A limit lowered below what was spent today leaves no credits, not fewer than none.
        return QuotaStatus(
            user_left=max(left[0] or 0, 0),
            user_limit=accounts[0].daily_limit or 0,
            group_left=max(left[1], 0) if len(left) > 1 and left[1] is not None else None,
            group_limit=accounts[1].daily_limit if len(accounts) > 1 else None,
            resets_at=next_reset(now, self._settings.zone),
            fixed_steps=self._fixed_steps,
        )

    def group_quota(self, channel: str, chat_id: int) -> int | None:
        with self._store.unit_of_work() as uow:
            return ledger.account_limit(uow.session, group_account(channel, chat_id))

    def _pressable(self, origin: Origin, press: ButtonPress, presser_is_admin: bool) -> JobView:
        """The done job a press refers to, if the presser may use it from where they are."""
        assert press.job_id is not None
        parent = self.find_job(press.job_id)
        # Callback data can be forged: a press counts only in the chat that holds the result.
        if (
            parent is None
            or parent.status != JobStatus.DONE
            or (parent.channel, parent.chat_id) != (origin.channel, origin.chat_id)
        ):
            raise ButtonRefused("button.stale")
        if not may_press(
            presser=origin.user_external_id,
            requester=parent.requester,
            in_group=parent.chat_type != "private",
            presser_is_admin=presser_is_admin,
        ):
            raise ButtonRefused("button.not_yours")
        return parent

    @staticmethod
    def _result_of(parent: JobView, index: int) -> tuple[str, str | None]:
        """The artifact key of one of a job's results, and its checksum when recorded."""
        if not 0 <= index < len(parent.result_paths):
            raise ButtonRefused("button.stale")
        checksums = parent.result_checksums
        return parent.result_paths[index], checksums[index] if index < len(checksums) else None

    def cancel(self, origin: Origin) -> list[JobView]:
        """Cancel the user's queued and running jobs in this chat, with their credits back;
        their held jobs in other chats may then be handed over."""
        with self._store.unit_of_work() as uow:
            cancelled = jobs.cancel_jobs(
                uow, origin.channel, origin.chat_id, origin.user_external_id
            )
        if cancelled:
            self.hand_over_held(cancelled[0].id)
        return cancelled

    def hand_over_all_held(self) -> list[int]:
        """After /resume: the held jobs whose turn has come."""
        return hand_over_all_held(self._store, self._publish, self._settings.max_jobs_in_flight)

    def hand_over_held(self, job_id: int) -> None:
        """Publish the held jobs of a job's user that now have a place."""
        hand_over_held(self._store, self._publish, job_id, self._settings.max_jobs_in_flight)

    def history(self, origin: Origin, page: int) -> tuple[list[JobView], int]:
        """A page of the user's results in this chat, newest first, and the number of pages."""
        with self._store.unit_of_work() as uow:
            return jobs.history_page(
                uow,
                origin.channel,
                origin.chat_id,
                origin.user_external_id,
                page,
                HISTORY_PAGE_SIZE,
            )

    def to_resend(self, origin: Origin, press: ButtonPress, presser_is_admin: bool) -> JobView:
        """A past result to send again by its Telegram file ids. Raises ButtonRefused."""
        parent = self._pressable(origin, press, presser_is_admin)
        if not parent.result_file_ids:
            raise ButtonRefused("button.result_gone")
        return parent

    def set_default_style(self, origin: Origin, key: str) -> Style | None:
        """Make a style the user's default; None when the catalogue no longer has it."""
        style = self.catalogue.get(key)
        if style is not None:
            with self._store.unit_of_work() as uow:
                jobs.set_default_style(uow, origin, style.key)
        return style

    def request_previews(self, origin: Origin) -> Accepted | None:
        """Queue the making of the style preview grid; None when a job is making it already
        (that job sends it to the chat that asked first)."""
        self._admit(origin, self._standing(origin), Command.STYLES)
        with self._store.unit_of_work() as uow:
            if jobs.active_job_of_kind(uow, JobKind.PREVIEWS) is not None:
                return None
        plan = plan_request(
            ImageRequest(Command.PORTRAIT, self.catalogue.defaults.avatar_prompt),
            None,
            avatar_prompt="",
            defaults=self._defaults,
            rng=self._rng,
        )
        return self._record(
            origin,
            lambda uow, limit: jobs.take_in(
                uow, origin, JobKind.PREVIEWS, plan, hand_over_limit=limit
            ),
        )

    def _record(
        self,
        origin: Origin,
        take_in: Callable[[UnitOfWork, int], jobs.TakenIn],
        on_duplicate: Callable[[UnitOfWork, JobView], None] | None = None,
        asked_before: bool = False,
    ) -> Accepted:
        limit = self._settings.max_jobs_in_flight
        with self._store.unit_of_work() as uow:
            try:
                taken = take_in(uow, limit)
            except QuotaExceeded as short:
                # Say when the credits come back, in the deployment's zone.
                resets = next_reset(datetime.now(UTC), self._settings.zone)
                short.params["resets"] = f"{resets:%H:%M} {self._settings.timezone}"
                raise
            except jobs.DuplicateRequest as duplicate:
                job = duplicate.job
                if on_duplicate is not None:
                    on_duplicate(uow, job)
                # Taken in long ago but never answered (the bot stopped in between), or
                # asked again by a caller that heard nothing: answer and publish it now.
                # Otherwise the first delivery of the update has it.
                age = (datetime.now(UTC) - job.created_at).total_seconds()
                answered = job.status_message_id is not None
                if not was_abandoned(job.status, answered, age, asked_before):
                    log.info(
                        "%s in chat %s repeated; job %s has it",
                        origin.request_key,
                        origin.chat_id,
                        job.id,
                    )
                    return Accepted(job_id=job.id, position=0, duplicate=True)
                # Its hand-over may have been marked before the bot stopped, and never
                # published: publish it again (a copy that was not lost finds the job
                # started or ended, and does nothing).
                handed_over = jobs.is_handed_over(uow, job.id) or jobs.claim_hand_over(
                    uow, job.id, limit
                )
                taken = jobs.TakenIn(job.id, handed_over, jobs.queue_position(uow, job.id))
        return self._accepted(origin, taken)

    @staticmethod
    def _accepted(origin: Origin, taken: jobs.TakenIn) -> Accepted:
        log.info("job %s accepted from %s chat %s", taken.job_id, origin.channel, origin.chat_id)
        return Accepted(job_id=taken.job_id, position=taken.position, handed_over=taken.handed_over)

    def attach_status_message(self, job_id: int, message_id: int) -> bool:
        """Record the status message sent after the job was handed over. False when its
        worker will not look for it any more (the job ended, or its result is on the way):
        the caller removes it."""
        return self.attach_status_messages([(job_id, message_id)])[0]

    def attach_status_messages(self, sent: Sequence[tuple[int, int]]) -> list[bool]:
        """`attach_status_message` for each (job id, message id), in one transaction."""
        with self._store.unit_of_work() as uow:
            return jobs.attach_status_messages(uow, sent)

    def dispatch(self, accepted: Accepted) -> bool:
        """Publish a job that was marked handed over when taken in (a held one waits: a
        worker hands it over when one of its user's jobs in flight ends). False when the
        broker refused it: the job is then marked failed, so the caller must tell the user."""
        return self.dispatch_many([accepted])[0]

    def dispatch_many(self, accepted: Sequence[Accepted]) -> list[bool]:
        """`dispatch` for each, published together. When the batch fails, each job is
        published on its own (with the broker client's retries on a lost connection); one
        the broker still refuses is marked failed. A copy of it that reached the broker all
        the same finds its job ended, and does nothing; so does a second copy of a job."""
        for held in (one for one in accepted if not one.handed_over):
            log.info("job %s held: its user has jobs in flight", held.job_id)
        job_ids = [one.job_id for one in accepted if one.handed_over]
        if len(job_ids) > 1:
            try:
                self._publish_many(job_ids)
                job_ids = []
            except Exception:
                log.warning("jobs %s not published together; one at a time", job_ids, exc_info=True)
        refused = {job_id for job_id in job_ids if not self._publish_one(job_id)}
        return [one.job_id not in refused for one in accepted]

    def _publish_one(self, job_id: int) -> bool:
        """Publish a job; when the broker refuses it, mark it failed. False when it failed
        here (the caller tells its user); True when it was published, or had already ended
        (a copy published before got through, or its user cancelled it), or when not even
        its failure could be recorded: it stays queued, and the reconciler publishes it
        again after CHITRAKAR_REPUBLISH_AFTER (its user waits; the rest of the batch does
        not fail with it)."""
        try:
            self._publish(job_id)
        except Exception as exc:
            log.exception("job %s could not be published", job_id)
            try:
                with self._store.unit_of_work() as uow:
                    why = f"not queued: {type(exc).__name__}: {exc}"
                    failed = jobs.fail_job(uow, job_id, why)
            except Exception:
                log.exception("job %s could not be recorded as failed; left queued", job_id)
                return True
            return failed is None
        return True


def _account_keys(origin: Origin) -> list[str]:
    """The accounts a request could be charged to: the user's, and in a group, the group's."""
    keys = [user_account(origin.channel, origin.user_external_id)]
    if origin.chat_type != "private":
        keys.append(group_account(origin.channel, origin.chat_id))
    return keys


def _publish_each(publish: Callable[[int], None], job_ids: Sequence[int]) -> None:
    for job_id in job_ids:
        publish(job_id)


def hand_over_held(
    store: Store, publish: Callable[[int], None], job_id: int, limit: int
) -> list[int]:
    """After a job of a user ended: hand over that user's oldest held jobs, as many as now
    have a place. Shared by the bot (after /cancel) and the workers (after a job)."""
    with store.unit_of_work() as uow:
        if audit.get_flag(uow, PAUSED_FLAG) is not None:
            return []  # paused: held jobs wait for /resume
        next_ids = jobs.next_held_jobs(uow, jobs.user_id_of(uow, job_id), limit)
    for next_id in next_ids:
        try:
            publish(next_id)
        except Exception:
            # Held again, so the next job of theirs to end tries once more.
            log.exception("job %s could not be handed over; held again", next_id)
            with store.unit_of_work() as uow:
                jobs.hold_again(uow, next_id)
    return next_ids


def hand_over_all_held(store: Store, publish: Callable[[int], None], limit: int) -> list[int]:
    """Hand over the held jobs of every user with free places: those whose hand-over was
    lost (a publish that failed, a process that stopped between taking a job in and handing
    it over). Run at a sole worker's start and every few minutes by beat."""
    handed: list[int] = []
    with store.unit_of_work() as uow:
        if audit.get_flag(uow, PAUSED_FLAG) is not None:
            return handed
        users = jobs.users_with_held_jobs(uow)
    for user_id in users:
        with store.unit_of_work() as uow:
            next_ids = jobs.next_held_jobs(uow, user_id, limit)
        for next_id in next_ids:
            try:
                publish(next_id)
                handed.append(next_id)
            except Exception:
                log.exception("job %s could not be handed over; held again", next_id)
                with store.unit_of_work() as uow:
                    jobs.hold_again(uow, next_id)
    if handed:
        log.warning("handed over %d held job(s) whose turn had come: %s", len(handed), handed)
    return handed


@dataclass(frozen=True)
class Reconciled:
    handed_back: list[int]  # running jobs of workers that stopped beating
    republished: list[int]  # queued jobs whose message may have been lost


def reconcile(store: Store, publish: Callable[[int], None], settings: Settings) -> Reconciled:
    """Make the database and the broker agree: every job the database says is queued or
    running is held by a live worker or has a message on its way. Every worker runs it (every
    CHITRAKAR_RECONCILE_INTERVAL seconds, beside its heartbeat); safe to run anywhere, any
    number of times: a
    duplicate message finds its job started or ended and does nothing."""
    now = datetime.now(UTC)
    with store.unit_of_work() as uow:
        alive = heartbeats.alive(uow, now - timedelta(seconds=settings.worker_stale_after))
    with store.unit_of_work() as uow:
        handed_back = jobs.hand_back_from_dead_workers(uow, alive)
    with store.unit_of_work() as uow:
        republished = jobs.republish_due(uow, now - timedelta(seconds=settings.republish_after))
    for job_id in handed_back + republished:
        try:
            publish(job_id)
        except Exception:
            # Marked published: the next round, after `republish_after`, tries again.
            log.exception("job %s could not be published again", job_id)
    if handed_back:
        log.warning(
            "handed back %d job(s) of workers that stopped: %s", len(handed_back), handed_back
        )
    if republished:
        log.warning(
            "published again %d job(s) whose message may be lost: %s", len(republished), republished
        )
    with store.unit_of_work() as uow:
        # Rows of workers gone for a day: nothing refers to them any more.
        heartbeats.forget_dead(uow, now - timedelta(days=1))
    return Reconciled(handed_back=handed_back, republished=republished)
