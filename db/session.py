"""Engine and unit of work. One unit of work owns one transaction."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            # WAL lets the bot read while a worker writes; foreign keys are off by default.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def dialect_name(database: Session | Connection) -> str:
    """ "sqlite" or "postgresql": the database the session or connection talks to."""
    if isinstance(database, Connection):
        return database.dialect.name
    return database.get_bind().dialect.name


def insert_in(dialect: str, table: Any) -> Any:
    """An INSERT with ON CONFLICT DO NOTHING / DO UPDATE (the generic insert has neither), in
    the named dialect: both have the same API. For statements built once per dialect."""
    return postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)


def dialect_insert(session: Session, table: Any) -> Any:
    """`insert_in` the dialect of the session's database."""
    return insert_in(dialect_name(session), table)


class UnitOfWork:
    """`with uow:` opens a session; `uow.commit()` makes its changes durable; leaving the
    block without committing rolls everything back."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._session_factory = session_factory

    def __enter__(self) -> UnitOfWork:
        self.session = self._session_factory()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.session.rollback()
        self.session.close()

    @property
    def connection(self) -> Connection:
        """The session's connection, in the session's transaction, for Core statements built
        once: run on it, such a statement costs about a quarter less CPU than through the
        session, which first takes it along the ORM's execution path (BENCHMARKS.md). It
        does not flush the session's pending objects first."""
        return self.session.connection()

    def commit(self) -> None:
        self.session.commit()


class Store:
    """The database of one process: an engine and units of work on it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._session_factory = sessionmaker(self.engine, expire_on_commit=False)

    def unit_of_work(self) -> UnitOfWork:
        return UnitOfWork(self._session_factory)

    def dispose(self) -> None:
        self.engine.dispose()
