"""A real Orthanc PACS for tests and benchmarks, started with a temporary config on free ports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def free_ports(count: int) -> list[int]:
    """Ports free right now (held open together so they differ)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def orthanc_config(folder: Path, http_port: int, dicom_port: int, aet: str) -> dict[str, Any]:
    return {
        "Name": "pacsnode-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "Plugins": [],  # the Debian package's default config loads plugins; not here
        "StorageCompression": False,
    }


@dataclass
class Orthanc:
    """A running Orthanc process and its REST API."""

    folder: Path
    http_port: int
    dicom_port: int
    aet: str = "ORTHANC"
    proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(cls, folder: Path, aet: str = "ORTHANC",
              ports: tuple[int, int] | None = None,
              extra_config: dict[str, Any] | None = None) -> Orthanc:
        """Start Orthanc; ``ports`` = (HTTP, DICOM), free ones when not given;
        ``extra_config`` adds or overrides configuration keys (DICOM TLS, say)."""
        folder.mkdir(parents=True, exist_ok=True)
        http_port, dicom_port = ports or free_ports(2)
        server = cls(folder, http_port, dicom_port, aet)
        config = folder / "orthanc.json"
        config.write_text(json.dumps({**orthanc_config(folder, http_port, dicom_port, aet),
                                      **(extra_config or {})}))
        with (folder / "orthanc.log").open("wb") as log:
            env = dict(os.environ, TCP_NODELAY="1")
            server.proc = subprocess.Popen(["Orthanc", str(config)], stdout=log,
                                           stderr=subprocess.STDOUT, env=env, cwd=folder)
        server._wait_ready()
        return server

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited:\n{self.log()}")
            try:
                self.get("/system")
                with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"Orthanc not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        path = self.folder / "orthanc.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def _request(self, path: str, body: Any = None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data)
        with urllib.request.urlopen(request, timeout=60) as response:
            return bytes(response.read())

    def get(self, path: str) -> Any:
        return json.loads(self._request(path))

    def series_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        """Every series Orthanc holds in the study, with its tags and instance ids."""
        return list(json.loads(self._request("/tools/find", {
            "Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True})))

    def modalities_of_study(self, study_uid: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for series in self.series_of_study(study_uid):
            modality = series["MainDicomTags"].get("Modality", "")
            counts[modality] = counts.get(modality, 0) + len(series["Instances"])
        return counts

    def delete(self, path: str) -> None:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}",
                                         method="DELETE")
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()

    def download(self, instance_id: str) -> bytes:
        return self._request(f"/instances/{instance_id}/file")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
