"""The ledger on real databases (SQLite and PostgreSQL): reserving is atomic under
concurrency, refunds happen exactly once, and a group's quota is drawn on with its members'."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import date

import pytest
from sqlalchemy import select

from chitrakar.domain import GenerationPlan, JobKind
from chitrakar.quota import Account, QuotaExceeded
from db import jobs, ledger
from db.jobs import Charge, Origin
from db.models import LedgerEntry
from db.session import Store

DAY = date(2026, 11, 26)
PLAN = GenerationPlan("p", 64, 64, 4, (1,), 7.0)


def origin(message_id: int, user: str = "42", chat_id: int = 42) -> Origin:
    chat_type = "private" if chat_id > 0 else "group"
    return Origin("telegram", chat_id, chat_type, user, "Asha", "en", message_id)


def charge(cost: int = 1, *accounts: Account) -> Charge:
    return Charge(accounts or (Account("user:telegram:42", 10),), cost, DAY)


def left(store: Store, account: Account, day: date = DAY) -> int | None:
    with store.unit_of_work() as uow:
        return ledger.balance(uow.session, account, day)


def test_fifty_simultaneous_requests_against_a_quota_of_ten_accept_ten(store: Store) -> None:
    def request(n: int) -> str:
        with store.unit_of_work() as uow:
            try:
                jobs.take_in(uow, origin(n), JobKind.PORTRAIT, PLAN, charge=charge())
            except QuotaExceeded as short:
                assert short.key == "quota.exceeded"
                return "refused"
            return "accepted"

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(request, range(50)))

    assert outcomes.count("accepted") == 10
    assert left(store, Account("user:telegram:42", 10)) == 0
    with store.unit_of_work() as uow:
        reserves = uow.session.scalars(select(LedgerEntry).where(LedgerEntry.kind == "reserve"))
        assert len(list(reserves)) == 10
        # A refused request recorded no job either.
        assert len(jobs.active_job_ids(uow)) == 10
    store.dispose()


def test_a_failed_job_is_refunded_exactly_once_and_a_done_one_never(store: Store) -> None:
    account = Account("user:telegram:42", 10)
    with store.unit_of_work() as uow:
        failing = jobs.take_in(uow, origin(1), JobKind.PORTRAIT, PLAN, charge=charge(3)).job_id
        done = jobs.take_in(uow, origin(2), JobKind.PORTRAIT, PLAN, charge=charge(2)).job_id
    assert left(store, account) == 5
    with store.unit_of_work() as uow:
        jobs.start_job(uow, failing, "w")
        assert jobs.fail_job(uow, failing, "boom") is not None
        assert jobs.fail_job(uow, failing, "again") is None  # already ended
        ledger.refund(uow.session, failing)  # a second refund changes nothing
        uow.commit()
        jobs.start_job(uow, done, "w")
        jobs.complete_job(
            uow, done, result_paths=["a.png"], result_file_ids=["x"], generation_seconds=1.0
        )
        ledger.refund(uow.session, done)  # committed: nothing to give back
        uow.commit()
    assert left(store, account) == 8
    with store.unit_of_work() as uow:
        kinds = [
            (e.job_id, e.kind, e.amount)
            for e in uow.session.scalars(select(LedgerEntry).order_by(LedgerEntry.id))
        ]
    assert sorted(kinds) == sorted(
        [
            (failing, "reserve", -3),
            (done, "reserve", -2),
            (failing, "refund", 3),
            (done, "commit", 0),
        ]
    )
    store.dispose()


def test_a_members_request_draws_on_the_user_and_the_group(store: Store) -> None:
    user = Account("user:telegram:42", 10)
    group = Account("group:telegram:-100", 3)
    with store.unit_of_work() as uow:
        jobs.take_in(
            uow, origin(1, chat_id=-100), JobKind.PORTRAIT, PLAN, charge=charge(2, user, group)
        )
        with pytest.raises(QuotaExceeded) as short:
            jobs.take_in(
                uow, origin(2, chat_id=-100), JobKind.PORTRAIT, PLAN, charge=charge(2, user, group)
            )
    assert short.value.key == "quota.exceeded_group"
    assert short.value.params == {"cost": 2, "left": 1}
    # Refused as a whole: the user's credits were not taken either.
    assert (left(store, user), left(store, group)) == (8, 1)
    # A group without a limit charges only the member.
    with store.unit_of_work() as uow:
        jobs.take_in(
            uow,
            origin(3, chat_id=-101),
            JobKind.PORTRAIT,
            PLAN,
            charge=charge(2, user, Account("group:telegram:-101", None)),
        )
    assert left(store, user) == 6
    store.dispose()


def test_a_job_charged_to_the_user_and_the_group_settles_both(store: Store) -> None:
    """Ending a job settles each account it drew on: both spent when it is done, both given
    back when it fails, and on the day each was reserved."""
    user = Account("user:telegram:42", 10)
    group = Account("group:telegram:-100", 10)
    with store.unit_of_work() as uow:
        done, failed = (
            jobs.take_in(
                uow, origin(n, chat_id=-100), JobKind.PORTRAIT, PLAN, charge=charge(3, user, group)
            ).job_id
            for n in (1, 2)
        )
        jobs.start_job(uow, done, "w")
        jobs.complete_job(uow, done, result_paths=[], result_file_ids=[], generation_seconds=1.0)
        jobs.start_job(uow, failed, "w")
        assert jobs.fail_job(uow, failed, "boom") is not None
    assert (left(store, user), left(store, group)) == (7, 7)
    with store.unit_of_work() as uow:
        entries = sorted(
            (e.job_id, e.account_id, e.kind, e.amount, e.day)
            for e in uow.session.scalars(select(LedgerEntry).where(LedgerEntry.kind != "reserve"))
        )
    accounts = sorted({account_id for _, account_id, *_ in entries})
    assert len(accounts) == 2
    assert entries == sorted(
        [(done, a, "commit", 0, DAY) for a in accounts]
        + [(failed, a, "refund", 3, DAY) for a in accounts]
    )
    store.dispose()


def test_credits_are_per_day_and_grants_add(store: Store) -> None:
    account = Account("user:telegram:42", 10)
    with store.unit_of_work() as uow:
        jobs.take_in(uow, origin(1), JobKind.PORTRAIT, PLAN, charge=charge(10))
        ledger.grant(uow.session, account.key, 5, DAY, note="festival bonus")
        uow.commit()
    assert left(store, account) == 5
    assert left(store, account, date(2026, 11, 27)) == 10
    store.dispose()


def test_a_job_cancelled_as_it_completes_stays_cancelled_and_refunded_once(
    store: Store,
) -> None:
    """The worker finishes just as the user cancels: whichever writes first wins, and the
    ledger holds either a commit or a refund, never both."""
    account = Account("user:telegram:42", 10)
    with store.unit_of_work() as uow:
        job_id = jobs.take_in(uow, origin(1), JobKind.PORTRAIT, PLAN, charge=charge(4)).job_id
        jobs.start_job(uow, job_id, "w")
    with store.unit_of_work() as worker:
        worker_view = jobs.get_job(worker, job_id)  # the worker has read RUNNING...
        assert worker_view is not None
        with store.unit_of_work() as user:
            assert [j.id for j in jobs.cancel_jobs(user, "telegram", 42, "42")] == [job_id]
        jobs.complete_job(  # ...and completes after the cancel was committed
            worker, job_id, result_paths=["a.png"], result_file_ids=["x"], generation_seconds=1.0
        )
    assert left(store, account) == 10
    with store.unit_of_work() as uow:
        kinds = sorted(e.kind for e in uow.session.scalars(select(LedgerEntry)))
        view = jobs.get_job(uow, job_id)
    assert kinds == ["refund", "reserve"]
    assert view is not None and view.status == "cancelled" and view.result_paths == ("a.png",)
    # A start arriving after the cancel does nothing either.
    with store.unit_of_work() as uow:
        assert jobs.start_job(uow, job_id, "w2") is None
    store.dispose()


def test_a_job_whose_results_are_recorded_is_not_cancelled_or_refunded(store: Store) -> None:
    """Its worker sends the images without looking again: a /cancel then would have made
    them free."""
    account = Account("user:telegram:42", 10)
    with store.unit_of_work() as uow:
        job_id = jobs.take_in(uow, origin(1), JobKind.PORTRAIT, PLAN, charge=charge(4)).job_id
        other = jobs.take_in(uow, origin(2), JobKind.PORTRAIT, PLAN, charge=charge(1)).job_id
        jobs.start_job(uow, job_id, "w")
        jobs.record_results(uow, job_id, "w", ["a.png"], ["00"])
    with store.unit_of_work() as user:
        assert [j.id for j in jobs.cancel_jobs(user, "telegram", 42, "42")] == [other]
    with store.unit_of_work() as worker:
        jobs.complete_job(
            worker, job_id, result_paths=["a.png"], result_file_ids=["x"], generation_seconds=1.0
        )
        view = jobs.get_job(worker, job_id)
    assert view is not None and view.status == "done"
    assert left(store, account) == 6  # the other job's credit back, this one's spent
    store.dispose()


def test_a_job_handed_back_after_its_results_were_recorded_can_be_cancelled(
    store: Store,
) -> None:
    """Its worker died between recording the results and sending them: back in the queue, it
    is made again by another worker, and until then its user may cancel it (they could not:
    "nothing queued or running", and no credits back)."""
    account = Account("user:telegram:42", 10)
    with store.unit_of_work() as uow:
        job_id = jobs.take_in(uow, origin(1), JobKind.PORTRAIT, PLAN, charge=charge(4)).job_id
        jobs.start_job(uow, job_id, "w")
        jobs.record_results(uow, job_id, "w", ["a.png"], ["00"])
    with store.unit_of_work() as reconciler:
        assert jobs.hand_back_from_dead_workers(reconciler, alive=set()) == [job_id]
    with store.unit_of_work() as user:
        assert [j.id for j in jobs.cancel_jobs(user, "telegram", 42, "42")] == [job_id]
    assert left(store, account) == 10
    store.dispose()
