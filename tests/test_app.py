"""One way to run a node: :class:`node.app.Node` started and stopped in this process,
and ``pacsnode serve`` (the same object) kept free of TensorFlow."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest

from node.app import Node, StartError
from node.audit_queries import list_studies
from node.config import Settings
from node.dicom.scu import Peer, echo, send_files
from tests.conftest import NodeProcess, free_port, make_series
from tests.test_models_cli import user_card, user_model


def settings_for(tmp_path: Path, port: int, **sections: Any) -> Settings:
    return Settings.model_validate({
        "node": {"host": "127.0.0.1", "port": port},
        "storage": {"data_dir": str(tmp_path / "var")},
        "study": {"stable_age_s": 60},
        "routes": [],
        **sections,
    })


def refuses_connections(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def test_a_node_starts_receives_stops_and_starts_again(tmp_path: Path) -> None:
    port = free_port()
    series = make_series(tmp_path / "ct", slices=3)
    peer = Peer("127.0.0.1", port, "PACSNODE", calling_ae="TESTSCU")
    with Node(settings_for(tmp_path, port)) as node:
        assert node.port == port
        assert echo(peer) == 0
        summary = send_files(series.paths, peer)
        assert (summary.sent, summary.failures) == (3, [])
    assert refuses_connections(port)  # stop() closed the listener

    again = Node(settings_for(tmp_path, port))
    again.start()
    try:
        assert node.engine is not None and again.engine is not None
        [study] = list_studies(again.engine)
        assert study["study_instance_uid"] == series.study_instance_uid
        assert study["instances"] == 3
    finally:
        again.stop()
        again.stop()  # a second stop is harmless
    assert refuses_connections(port)


def test_a_taken_port_is_a_start_error_and_nothing_is_left_running(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        node = Node(settings_for(tmp_path, port))
        with pytest.raises(StartError, match=r"cannot listen on 127\.0\.0\.1:\d+ .*node\.port"):
            node.start()
    assert node._stops == []  # everything started before the failure was stopped


def mapped_libraries(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError):  # a process that ended meanwhile
        return ""


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return found


def test_serve_never_loads_tensorflow_but_its_workers_check_the_models(tmp_path: Path) -> None:
    """A configured model is validated at start, in an analysis worker process."""
    user_model(tmp_path / "liver.keras")
    user_card(tmp_path / "liver.json")
    models = ('[{"name": "mine", "path": "%s", "card": "%s"}]'
              % (tmp_path / "liver.keras", tmp_path / "liver.json"))
    routes = '[{"name": "liver", "match": {"modality": "CT"}, "pipeline": "cnn", "model": "mine"}]'
    node = NodeProcess(data_dir=tmp_path / "var", port=free_port(), db_url=(
        f"sqlite:///{tmp_path / 'var' / 'pacsnode.db'}"),
        extra_env={"PACSNODE__MODELS": models, "PACSNODE__ROUTES": routes}).start()
    try:
        assert node.proc is not None
        assert "tensorflow" not in mapped_libraries(node.proc.pid)
        # The model was loaded (and so checked) before the node listened: by a worker.
        deadline = time.monotonic() + 5
        while not any("tensorflow" in maps for c in children(node.proc.pid)
                      if (maps := mapped_libraries(c))):
            assert time.monotonic() < deadline, "no worker process has TensorFlow loaded"
            time.sleep(0.1)
        assert "tensorflow" not in mapped_libraries(node.proc.pid)
    finally:
        node.stop()
