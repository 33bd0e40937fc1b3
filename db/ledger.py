"""The credit ledger: entries are only ever appended, and a balance is derived from them.

Reserving is atomic on SQLite and PostgreSQL alike: each paying account's row is updated
first, which takes its row lock (PostgreSQL) or the database's write lock (SQLite), so a
concurrent reservation waits and then sees this one's entries before it sums its own.
Functions here work inside the caller's transaction and do not commit.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from datetime import date
from functools import cache
from typing import Any, cast

from sqlalchemy import Connection, Table, bindparam, exists, func, insert, literal, select, update
from sqlalchemy.orm import Session

from chitrakar.quota import Account, exceeded
from db.models import Account as AccountRow
from db.models import LedgerEntry, utcnow
from db.session import dialect_name, insert_in

GRANT, RESERVE, COMMIT, REFUND = "grant", "reserve", "commit", "refund"
# What a user since forgotten used on a day, kept with no job (db.privacy.delete).
CARRIED = "carried"

# The tables, for Core statements on the path of every request.
ACCOUNTS = cast(Table, AccountRow.__table__)
LEDGER = cast(Table, LedgerEntry.__table__)


# Statements of every request, built once (building one costs more than running it); the
# values of an INSERT are the parameters it is executed with.
_SPENT_NET = select(func.coalesce(func.sum(LEDGER.c.amount), 0)).where(
    LEDGER.c.account_id == bindparam("account_id"), LEDGER.c.day == bindparam("day")
)
_ACCOUNT_LIMIT = select(ACCOUNTS.c.daily_limit).where(ACCOUNTS.c.key == bindparam("account_key"))
_ACCOUNT_LIMITS = select(ACCOUNTS.c.key, ACCOUNTS.c.daily_limit).where(
    ACCOUNTS.c.key.in_(bindparam("account_keys", expanding=True)),
    ACCOUNTS.c.daily_limit.is_not(None),
)
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


def paying(accounts: Iterable[Account], cost: int) -> list[Account]:
    """The accounts `reserve` takes `cost` from, and locks, in that order (by key): those
    with a limit; none when it costs nothing."""
    if cost <= 0:
        return []
    return sorted((a for a in accounts if a.daily_limit is not None), key=lambda a: a.key)


def lock_accounts(connection: Connection, keys: Iterable[str]) -> None:
    """Lock these accounts' rows (made if new) for the rest of the transaction, in key order,
    the order `reserve` takes them in."""
    for key in sorted(set(keys)):
        _locked_account_id(connection, key)


def _locked_account_id(connection: Connection, key: str) -> int:
    """The account's id, its row made if new, and locked for the rest of the transaction: the
    upsert bumps lock_version, which takes the row's lock (PostgreSQL) or the write lock
    (SQLite)."""
    upsert = _account_upsert(dialect_name(connection))
    return int(connection.execute(upsert, {"key": key, "lock_version": 0}).scalar_one())


def _spent_net(connection: Connection, account_id: int, day: date) -> int:
    """The sum of the day's entries: grants and refunds add, reserves subtract."""
    total = connection.scalar(_SPENT_NET, {"account_id": account_id, "day": day})
    return int(total or 0)


def balance(session: Session, account: Account, day: date) -> int | None:
    """Credits left on a day; None for an account without a limit."""
    if account.daily_limit is None:
        return None
    account_id = session.scalar(select(AccountRow.id).where(AccountRow.key == account.key))
    spent = _spent_net(session.connection(), account_id, day) if account_id is not None else 0
    return account.daily_limit + spent


def reserve(
    connection: Connection, accounts: Sequence[Account], job_id: int, cost: int, day: date
) -> None:
    """Take `cost` credits from every limited account, or from none: raises QuotaExceeded
    (naming the first account short of credits) when any has too few left."""
    limited = paying(accounts, cost)
    if not limited:
        return
    ids = []
    # Locks are taken in key order, so two reservations never wait on each other in a cycle.
    for account in limited:
        account_id = _locked_account_id(connection, account.key)
        assert account.daily_limit is not None
        left = account.daily_limit + _spent_net(connection, account_id, day)
        if cost > left:
            raise exceeded(account.key, cost, left)
        ids.append(account_id)
    connection.execute(
        _NEW_ENTRY,
        [
            {"account_id": i, "job_id": job_id, "kind": RESERVE, "amount": -cost, "day": day}
            for i in ids
        ],
    )


@cache
def _settle_reserves(dialect: str, kind: str) -> Any:
    """One statement that appends a `kind` entry (COMMIT: 0; REFUND: what was reserved) for
    each of a job's reserves, unless the other of the two is there: never both, and each at
    most once (the ledger's unique index)."""
    reserve, other = LEDGER.alias("reserve"), LEDGER.alias("other")
    unless = REFUND if kind == COMMIT else COMMIT
    entries = select(
        reserve.c.account_id,
        reserve.c.job_id,
        literal(kind, LEDGER.c.kind.type),
        literal(0) if kind == COMMIT else -reserve.c.amount,
        reserve.c.day,
        bindparam("now", type_=LEDGER.c.at.type),
    ).where(
        reserve.c.job_id == bindparam("job_id"),
        reserve.c.kind == RESERVE,
        ~exists().where(
            other.c.account_id == reserve.c.account_id,
            other.c.job_id == reserve.c.job_id,
            other.c.kind == unless,
        ),
    )
    return (
        insert_in(dialect, LEDGER)
        .from_select(["account_id", "job_id", "kind", "amount", "day", "at"], entries)
        .on_conflict_do_nothing(index_elements=["account_id", "job_id", "kind"])
    )


def refund(session: Session, job_id: int) -> None:
    """Give back what a job reserved, on the day it was reserved: exactly once however often
    it is called, and never after the job was committed."""
    statement = _settle_reserves(dialect_name(session), REFUND)
    session.execute(statement, {"job_id": job_id, "now": utcnow()})


def commit(connection: Connection, job_id: int) -> None:
    """Make a job's reservation final (the job delivered its images); never after a refund."""
    statement = _settle_reserves(dialect_name(connection), COMMIT)
    connection.execute(statement, {"job_id": job_id, "now": utcnow()})


def grant(session: Session, key: str, amount: int, day: date, note: str | None = None) -> None:
    session.add(
        LedgerEntry(
            account_id=_locked_account_id(session.connection(), key),
            kind=GRANT,
            amount=amount,
            day=day,
            note=note,
        )
    )
    session.flush()


def account_limit(session: Session, key: str) -> int | None:
    return session.scalar(_ACCOUNT_LIMIT, {"account_key": key})


def account_limits(connection: Connection, keys: Collection[str]) -> dict[str, int]:
    """The limit set on each of these accounts that has one, in one statement."""
    found = connection.execute(_ACCOUNT_LIMITS, {"account_keys": keys})
    return {row.key: row.daily_limit for row in found}


def set_account_limit(session: Session, key: str, limit: int | None) -> None:
    account_id = _locked_account_id(session.connection(), key)
    session.execute(update(AccountRow).where(AccountRow.id == account_id).values(daily_limit=limit))
