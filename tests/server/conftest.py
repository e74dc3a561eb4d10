"""Review-station fixtures: the real app on a real database, one Analyzer per session.

`station` runs on SQLite, and on PostgreSQL too when LEUKODIFF_TEST_POSTGRES_URL is
set (`.ci/services.sh` starts one); `live_server` serves the app over loopback
for the browser and load tests.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, make_url, text
from station_helpers import PASSWORD, login

from leukodiff.pipeline import Analyzer
from leukodiff.server import Settings, create_app
from leukodiff.server.auth import create_user

POSTGRES_ENV = "LEUKODIFF_TEST_POSTGRES_URL"


@pytest.fixture(scope="session")
def analyzer() -> Analyzer:
    """The shipped models, loaded once for every app of the session."""
    return Analyzer.load()


@pytest.fixture(scope="session")
def bccd(shared_data: Path) -> Path:
    folder = shared_data / "bccd" / "BCCD" / "JPEGImages"
    if not folder.is_dir():
        pytest.fail(f"BCCD fields needed by the server tests: {folder} not found")
    return folder


def reset_postgres(url: str, schema: str = "public") -> None:
    """An empty schema, so each test migrates a fresh database."""
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()


def worker_schema() -> str:
    """public, or under pytest-xdist a schema of this worker's own (test_gw0, ...): two
    workers never empty each other's tables."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    return f"test_{worker}" if worker else "public"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """None (SQLite in the data dir) or the CI PostgreSQL, emptied for this test."""
    if request.param == "sqlite":
        return None
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"PostgreSQL tests need ${POSTGRES_ENV} (run `source .ci/services.sh`)")
    schema = worker_schema()
    reset_postgres(url, schema)
    if schema == "public":
        return url
    return make_url(url).update_query_dict({"options": f"-csearch_path={schema}"}
                                           ).render_as_string(hide_password=False)


@dataclass
class Station:
    """One running app with helpers to make users and signed-in clients."""

    app: FastAPI
    settings: Settings

    def add_user(self, username: str, role: str, password: str = PASSWORD) -> None:
        with self.app.state.leukodiff.db.writing() as session:
            create_user(session, username, password, role)

    def client(self, username: str | None = None, role: str = "technologist") -> TestClient:
        client = TestClient(self.app)
        if username is not None:
            self.add_user(username, role)
            login(client, username)
        return client


@pytest.fixture
def make_station(tmp_path: Path, analyzer: Analyzer):
    """Build stations on demand (custom settings); each is shut down after the test."""
    running: list[TestClient] = []

    def make(database_url: str | None = None, **overrides) -> Station:
        settings = Settings(data_dir=tmp_path / f"data{len(running)}",
                            database_url=database_url, **overrides)
        app = create_app(settings, analyzer=analyzer)
        lifespan = TestClient(app)
        lifespan.__enter__()
        running.append(lifespan)
        return Station(app, settings)

    yield make
    for client in running:
        client.__exit__(None, None, None)


@pytest.fixture
def station(make_station, database_url: str | None) -> Station:
    return make_station(database_url)


@pytest.fixture
def sqlite_station(make_station) -> Station:
    return make_station(None)


@dataclass
class LiveServer:
    url: str
    station: Station


@pytest.fixture
def make_live_server(tmp_path: Path, analyzer: Analyzer) -> Iterator:
    """Start the app under uvicorn on a free loopback port, in a thread; stopped after the test."""
    running: list[tuple[uvicorn.Server, threading.Thread, socket.socket]] = []

    def start(database_url: str | None = None) -> LiveServer:
        settings = Settings(data_dir=tmp_path / f"live{len(running)}", database_url=database_url)
        app = create_app(settings, analyzer=analyzer)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        # Keep-alive longer than httpx's 5 s pool expiry: with both at 5 s a client could
        # reuse a connection the server was closing that instant (flaky ECONNRESET under load).
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=30))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        running.append((server, thread, sock))
        deadline = time.monotonic() + 15
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start within 15 s")
            time.sleep(0.05)
        return LiveServer(f"http://127.0.0.1:{sock.getsockname()[1]}", Station(app, settings))

    yield start
    for server, thread, sock in running:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture
def live_server(make_live_server) -> LiveServer:
    return make_live_server(None)
