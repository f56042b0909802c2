"""Shared fixtures: a real node process, generated CT series, the PostgreSQL server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

from analysis.phantoms.dicom_series import SeriesInfo, write_ct_series
from analysis.phantoms.trunk import PhantomSpec, make_phantom

PACSNODE = [sys.executable, "-m", "node.cli"]
POSTGRES_ADMIN_URL = os.environ.get(
    "PACSNODE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def missing_peer(reason: str) -> NoReturn:
    """A real peer (DCMTK, Orthanc, dciodvfy, the PostgreSQL server) is absent.

    On a developer's machine that is a skip; in CI (``CI=true``) it fails the run, so a
    broken CI image cannot turn the integration tests into a green row of skips.
    """
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} [CI=true: a missing peer fails the run]", pytrace=False)
    pytest.skip(reason)


def require_tool(*names: str) -> None:
    """Skip (fail in CI) unless the command-line tools exist (``make test`` installs them)."""
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        missing_peer(f"not installed: {', '.join(missing)} (run 'make test' to install)")


def query(db_url: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    """Rows of a read-only SQL query on a node's database, as dicts (the node may be
    running: SQLite's WAL lets a reader in beside it)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(text(sql), params)]
    finally:
        engine.dispose()


def dcmtk_env() -> dict[str, str]:
    """DCMTK stalls ~40 ms per instance on Nagle's algorithm unless told otherwise."""
    return dict(os.environ, TCP_NODELAY="1")


def wait_for_port(port: int, proc: subprocess.Popen[Any] | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


@dataclass
class NodeProcess:
    """A ``pacsnode serve`` subprocess with its own port, data folder and database."""

    data_dir: Path
    port: int
    db_url: str
    ae_title: str = "PACSNODE"
    stable_age_s: float = 30.0
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    #: Runs ``pacsnode serve`` under this command (e.g. ``unshare --pid --fork``).
    prefix: list[str] = field(default_factory=list)
    #: The web application's port (every test node serves it, as ``serve`` does).
    web_port: int = field(default_factory=lambda: free_port())

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACSNODE")}
        env.update(
            {
                "PACSNODE__NODE__AE_TITLE": self.ae_title,
                "PACSNODE__NODE__HOST": "127.0.0.1",
                "PACSNODE__NODE__PORT": str(self.port),
                "PACSNODE__STORAGE__DATA_DIR": str(self.data_dir),
                "PACSNODE__DATABASE__URL": self.db_url,
                "PACSNODE__STUDY__STABLE_AGE_S": str(self.stable_age_s),
                "PACSNODE__STUDY__CHECK_INTERVAL_S": "0.2",
                # Receiving tests need no analysis; analysis tests set their routes.
                "PACSNODE__ROUTES": "[]",
                "PACSNODE__JOBS__POLL_INTERVAL_S": "0.2",
                "PACSNODE__DELIVERY__POLL_INTERVAL_S": "0.2",
                "PACSNODE__WEB__PORT": str(self.web_port),
            }
        )
        env.update(self.extra_env)
        return env

    def start(self) -> NodeProcess:
        self.log_path = self.data_dir.parent / f"node-{self.port}-{uuid.uuid4().hex[:6]}.log"
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen([*self.prefix, *PACSNODE, "serve"], env=self.env,
                                     stdout=log, stderr=log)
        try:
            wait_for_port(self.port, self.proc)
            if self.env.get("PACSNODE__WEB__ENABLED", "true") != "false":
                wait_for_port(self.web_port, self.proc)  # started after the listener
        except Exception:
            self.stop()
            raise RuntimeError(f"node did not start:\n{self.log()}") from None
        return self

    @property
    def web_url(self) -> str:
        scheme = "https" if "PACSNODE__WEB__TLS" in self.extra_env else "http"
        return f"{scheme}://127.0.0.1:{self.web_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: no clean-up code runs, exactly like a crash or the OOM killer."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*PACSNODE, *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        if check and result.returncode != 0:
            raise AssertionError(f"pacsnode {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def studies(self) -> list[dict[str, Any]]:
        return json.loads(self.cli("studies", "--json").stdout)

    def study(self, uid: str) -> dict[str, Any]:
        return json.loads(self.cli("study", uid, "--json").stdout)

    def storescu(self, *paths: Path | str, calling: str = "STORESCU", called: str | None = None,
                 check: bool = True) -> subprocess.CompletedProcess[str]:
        """Send with DCMTK storescu (verbose, so refusals show in the output)."""
        result = subprocess.run(
            ["storescu", "-v", "-aet", calling, "-aec", called or self.ae_title,
             "127.0.0.1", str(self.port), *map(str, paths)],
            env=dcmtk_env(), capture_output=True, text=True, timeout=300,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"storescu failed:\n{result.stdout}\n{result.stderr}")
        return result


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Any]:
    """A real Orthanc (the demo PACS) on free ports, stopped afterwards."""
    from tests.orthanc import Orthanc

    require_tool("Orthanc")
    server = Orthanc.start(tmp_path / "orthanc")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    """The PostgreSQL server of this machine, or a skip (a failure in CI) saying it is
    absent."""
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
    except Exception as exc:  # any failure means: no usable server here
        missing_peer(f"no PostgreSQL server at {POSTGRES_ADMIN_URL}: {str(exc).splitlines()[0]}")
    return POSTGRES_ADMIN_URL


@pytest.fixture
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"pacsnode_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(postgres_admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            for attempt in range(5):  # a process still stopping may reconnect meanwhile
                conn.execute(
                    text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = :n"), {"n": name},
                )
                try:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
                    break
                except Exception:
                    if attempt == 4:
                        raise
                    time.sleep(0.5)
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each storage test runs on SQLite and on PostgreSQL (skipped if no server)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'var' / 'pacsnode.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Any]:
    """Factory: ``make_node(db_url=None, **fields)`` starts a node and stops it at the end."""
    nodes: list[NodeProcess] = []

    def factory(db_url: str | None = None, **kwargs: Any) -> NodeProcess:
        data_dir = kwargs.pop("data_dir", tmp_path / "var")
        node = NodeProcess(
            data_dir=data_dir,
            port=kwargs.pop("port", free_port()),
            db_url=db_url or f"sqlite:///{data_dir / 'pacsnode.db'}",
            **kwargs,
        )
        nodes.append(node)
        return node.start()

    yield factory
    for node in nodes:
        node.stop()


@pytest.fixture
def node(db_url: str, make_node: Any) -> NodeProcess:
    """A running node on SQLite, then on PostgreSQL."""
    # db_url first: fixtures are torn down in reverse, so the node stops before its
    # database is dropped.
    return make_node(db_url=db_url)


@pytest.fixture
def sqlite_node(make_node: Any) -> NodeProcess:
    """A running node on the embedded default (SQLite)."""
    return make_node()


def make_series(folder: Path, slices: int = 8, size: int = 64, **kwargs: Any) -> SeriesInfo:
    spec = PhantomSpec(slices=slices, rows=size, columns=size, pixel_spacing_mm=400 / size,
                       seed=kwargs.pop("seed", 0))
    return write_ct_series(make_phantom(spec), folder, **kwargs)


@pytest.fixture
def ct_series(tmp_path: Path) -> SeriesInfo:
    """A small synthetic CT series (8 slices of 64x64) with fresh UIDs."""
    return make_series(tmp_path / "ct")


def save_instance(ds: Any, path: Path) -> Path:
    """Write a created instance as the node files its results: staged, fsync'ed, linked
    into place and its folder fsync'ed (:class:`node.ingest.storage.InstanceStore`)."""
    from pathlib import PurePosixPath

    from node.ingest.storage import InstanceStore
    from node.workflow.analyze import dataset_bytes

    store = InstanceStore(path.parent)
    store.publish(store.stage([dataset_bytes(ds)]), PurePosixPath(path.name))
    return path
