"""The credit ledger: entries are only ever appended, and a balance is derived from them.

Reserving is atomic on SQLite and PostgreSQL alike: each paying account's row is updated
first, which takes its row lock (PostgreSQL) or the database's write lock (SQLite), so a
concurrent reservation waits and then sees this one's entries before it sums its own.
Functions here work inside the caller's transaction and do not commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from functools import cache
from typing import Any, cast

from sqlalchemy import Table, bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from chitrakar.quota import Account, exceeded
from db.models import Account as AccountRow
from db.models import LedgerEntry
from db.session import dialect_insert, dialect_name, insert_in

GRANT, RESERVE, COMMIT, REFUND = "grant", "reserve", "commit", "refund"

# The tables, for Core statements on the path of every request.
ACCOUNTS = cast(Table, AccountRow.__table__)
LEDGER = cast(Table, LedgerEntry.__table__)


# Statements of every request, built once (building one costs more than running it); the
# values of an INSERT are the parameters it is executed with.
_SPENT_NET = select(func.coalesce(func.sum(LEDGER.c.amount), 0)).where(
    LEDGER.c.account_id == bindparam("account_id"), LEDGER.c.day == bindparam("day")
)
_ACCOUNT_LIMIT = select(ACCOUNTS.c.daily_limit).where(ACCOUNTS.c.key == bindparam("account_key"))
_NEW_ENTRY = insert(LEDGER)


@cache
def _account_upsert(dialect: str) -> Any:
    return (
        insert_in(dialect, ACCOUNTS)
        .on_conflict_do_update(
            index_elements=["key"], set_={"lock_version": ACCOUNTS.c.lock_version + 1}
        )
        .returning(ACCOUNTS.c.id)
    )


def _locked_account_id(session: Session, key: str) -> int:
    """The account's id, its row made if new, and locked for the rest of the transaction: the
    upsert bumps lock_version, which takes the row's lock (PostgreSQL) or the write lock
    (SQLite)."""
    upsert = _account_upsert(dialect_name(session))
    return int(session.execute(upsert, {"key": key, "lock_version": 0}).scalar_one())


def _spent_net(session: Session, account_id: int, day: date) -> int:
    """The sum of the day's entries: grants and refunds add, reserves subtract."""
    total = session.scalar(_SPENT_NET, {"account_id": account_id, "day": day})
    return int(total or 0)


def balance(session: Session, account: Account, day: date) -> int | None:
    """Credits left on a day; None for an account without a limit."""
    if account.daily_limit is None:
        return None
    account_id = session.scalar(select(AccountRow.id).where(AccountRow.key == account.key))
    spent = _spent_net(session, account_id, day) if account_id is not None else 0
    return account.daily_limit + spent


def reserve(
    session: Session, accounts: Sequence[Account], job_id: int, cost: int, day: date
) -> None:
    """Take `cost` credits from every limited account, or from none: raises QuotaExceeded
    (naming the first account short of credits) when any has too few left."""
    limited = sorted((a for a in accounts if a.daily_limit is not None), key=lambda a: a.key)
    if cost <= 0 or not limited:
        return
    ids = []
    # Locks are taken in key order, so two reservations never wait on each other in a cycle.
    for account in limited:
        account_id = _locked_account_id(session, account.key)
        assert account.daily_limit is not None
        left = account.daily_limit + _spent_net(session, account_id, day)
        if cost > left:
            raise exceeded(account.key, cost, left)
        ids.append(account_id)
    session.execute(
        _NEW_ENTRY,
        [
            {"account_id": i, "job_id": job_id, "kind": RESERVE, "amount": -cost, "day": day}
            for i in ids
        ],
    )


def _reserves_of(session: Session, job_id: int) -> list[LedgerEntry]:
    return list(
        session.scalars(
            select(LedgerEntry).where(LedgerEntry.job_id == job_id, LedgerEntry.kind == RESERVE)
        )
    )


def _append_once(session: Session, reserve_entry: LedgerEntry, kind: str, amount: int) -> None:
    session.execute(
        dialect_insert(session, LedgerEntry)
        .values(
            account_id=reserve_entry.account_id,
            job_id=reserve_entry.job_id,
            kind=kind,
            amount=amount,
            day=reserve_entry.day,
        )
        .on_conflict_do_nothing(index_elements=["account_id", "job_id", "kind"])
    )


def refund(session: Session, job_id: int) -> None:
    """Give back what a job reserved, on the day it was reserved: exactly once however often
    it is called (the ledger's unique index), and never after the job was committed."""
    for entry in _reserves_of(session, job_id):
        if not _has(session, entry, COMMIT):
            _append_once(session, entry, REFUND, -entry.amount)


def commit(session: Session, job_id: int) -> None:
    """Make a job's reservation final (the job delivered its images); never after a refund."""
    for entry in _reserves_of(session, job_id):
        if not _has(session, entry, REFUND):
            _append_once(session, entry, COMMIT, 0)


def _has(session: Session, entry: LedgerEntry, kind: str) -> bool:
    found = session.scalar(
        select(LedgerEntry.id).where(
            LedgerEntry.account_id == entry.account_id,
            LedgerEntry.job_id == entry.job_id,
            LedgerEntry.kind == kind,
        )
    )
    return found is not None


def grant(session: Session, key: str, amount: int, day: date, note: str | None = None) -> None:
    session.add(
        LedgerEntry(
            account_id=_locked_account_id(session, key),
            kind=GRANT,
            amount=amount,
            day=day,
            note=note,
        )
    )
    session.flush()


def account_limit(session: Session, key: str) -> int | None:
    return session.scalar(_ACCOUNT_LIMIT, {"account_key": key})


def set_account_limit(session: Session, key: str, limit: int | None) -> None:
    account_id = _locked_account_id(session, key)
    session.execute(update(AccountRow).where(AccountRow.id == account_id).values(daily_limit=limit))
