"""Portrait jobs put straight into the store for a worker runtime run in the test process, as
the bot would have taken them in, each from its own user's private chat in the emulator."""

from __future__ import annotations

from chitrakar.domain import GenerationPlan, JobKind
from db import jobs
from db.jobs import Origin
from tests.support.botapi import BotApiEmulator
from workers.runtime import WorkerRuntime


class QueuedJobs:
    def __init__(self, emulator: BotApiEmulator, runtime: WorkerRuntime) -> None:
        self.emulator, self.runtime = emulator, runtime
        # Each job's chat.
        self.chats: dict[int, int] = {}

    def job(
        self, user_id: int, plan: GenerationPlan, handed_over: bool = True, limit: int = 2
    ) -> int:
        """A `/portrait` of `plan` from the user; handed to the broker (within `limit` jobs in
        flight for the user) unless `handed_over` is False: then it is held."""
        user = self.emulator.user(user_id, f"User {user_id}")
        chat = self.emulator.private_chat(user)
        command = self.emulator.history_message(chat, user, f"/portrait {plan.prompt}")
        origin = Origin(
            "telegram", chat["id"], "private", str(user_id), "U", "en", command["message_id"]
        )
        with self.runtime.store.unit_of_work() as uow:
            job_id = jobs.take_in(uow, origin, JobKind.PORTRAIT, plan).job_id
        if handed_over:
            with self.runtime.store.unit_of_work() as uow:
                assert jobs.claim_hand_over(uow, job_id, limit=limit)
        self.chats[job_id] = chat["id"]
        return job_id

    def view(self, job_id: int) -> jobs.JobView:
        with self.runtime.store.unit_of_work() as uow:
            view = jobs.get_job(uow, job_id)
        assert view is not None
        return view
