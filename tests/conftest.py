"""Fixtures shared by the whole suite: a real PostgreSQL server for the session, and a
fresh, migrated database per test on SQLite and on PostgreSQL (`database_url`, `store`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ca_server.db import Store, make_engine, migrate, sqlite_url
from tests.support.postgres import PostgresServer, PostgresUnavailable, start_postgres


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the test session. Missing binaries fail the test under
    CI=true and skip it elsewhere, both naming scripts/system-deps.sh."""
    try:
        server = start_postgres()
    except PostgresUnavailable as error:
        problem = f"cannot start PostgreSQL: {error}"
    else:
        problem = ""
    if problem:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a new, empty database: an SQLite file, or a PostgreSQL database."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "ca.db")
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    url = server.create_database()
    try:
        yield url
    finally:
        server.drop_database(url)


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    """A `Store` on a fresh database brought to the newest schema by `migrate.upgrade`."""
    engine = make_engine(database_url)
    migrate.upgrade(engine)
    db_store = Store(engine)
    try:
        yield db_store
    finally:
        db_store.close()
