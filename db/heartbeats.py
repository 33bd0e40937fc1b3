"""Worker heartbeats: each worker process writes its row every few seconds; a worker whose
row is older than the stale limit is taken for dead (killed, its machine gone)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BindParameter, Select, delete, select, update

from db.models import WorkerHeartbeat, utcnow
from db.session import UnitOfWork


def beat(uow: UnitOfWork, name: str) -> None:
    now = utcnow()
    touched = uow.session.execute(
        update(WorkerHeartbeat).where(WorkerHeartbeat.name == name).values(beat_at=now)
    )
    if touched.rowcount == 0:  # type: ignore[attr-defined]
        uow.session.add(WorkerHeartbeat(name=name, started_at=now, beat_at=now))
    uow.commit()


def alive_names(since: datetime | BindParameter[datetime]) -> Select[str]:
    """The workers that beat since `since`, as a query (a statement may use it inside)."""
    return select(WorkerHeartbeat.name).where(WorkerHeartbeat.beat_at >= since)


def alive(uow: UnitOfWork, since: datetime) -> set[str]:
    """The workers that beat since `since`."""
    return set(uow.session.scalars(alive_names(since)))


def forget(uow: UnitOfWork, name: str) -> None:
    """A worker stopping cleanly: it holds nothing any more."""
    uow.session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.name == name))
    uow.commit()


def forget_dead(uow: UnitOfWork, before: datetime) -> None:
    uow.session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.beat_at < before))
    uow.commit()


def forget_all_but(uow: UnitOfWork, name: str) -> None:
    """A sole worker starting (`chitrakar run`): no other worker can be running anything."""
    uow.session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.name != name))
    uow.commit()
