from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from db.migrate import upgrade_to_head
from db.session import Store
from tests.support.botapi import BotApiEmulator

POSTGRES_ADMIN_URL = os.environ.get(
    "CHITRAKAR_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("CHITRAKAR_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
# The tests that torch.compile the tiny model on this CPU check which graphs compile, not how
# fast their kernels run, and Inductor's C++ without SIMD compiles faster (those five tests
# took 348 s, and 250 s without, on 2 cores: BENCHMARKS.md). Read when Inductor is imported.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")


def _unavailable(what: str, exc: Exception) -> None:
    # CI starts both servers: there, a missing one is a failure, not a skip.
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not reachable in CI: {exc}")
    pytest.skip(f"{what} is not reachable: {exc}")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def emulator() -> Iterator[BotApiEmulator]:
    emulator = BotApiEmulator().start()
    yield emulator
    emulator.stop()


@pytest.fixture(scope="session")
def postgres_server() -> str:
    from sqlalchemy import create_engine, text

    engine = create_engine(POSTGRES_ADMIN_URL)
    try:
        with engine.connect() as connection:
            connection.execute(text("select 1"))
    except Exception as exc:
        _unavailable("PostgreSQL", exc)
    finally:
        engine.dispose()
    return POSTGRES_ADMIN_URL


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    from tests.support.stack import fresh_postgres_database

    with fresh_postgres_database(postgres_server) as url:
        yield url


@pytest.fixture
def redis_url() -> str:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
        client.flushdb()
    except Exception as exc:
        _unavailable("Redis", exc)
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    """The database at `database_url`, migrated, for one test."""
    upgrade_to_head(database_url)
    store = Store(database_url)
    yield store
    # Its pooled connections closed now, not by the garbage collector during a later test.
    store.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url
