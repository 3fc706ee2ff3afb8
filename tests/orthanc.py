"""Test harness: Debian's Orthanc as a plain local process, the PACS that forwards to the daemon.

Orthanc runs from a generated JSON config in a private directory (its own storage and index),
on free loopback ports, with no plugins unless asked (``plugins=[DICOMWEB_PLUGIN]`` serves
DICOMweb under ``/dicom-web/``) and no REST authentication. Everything that shapes its
C-STORE SCU stays at Orthanc's defaults, so ``store()`` runs the same forward job a real
Orthanc would: non-permissive (the first refused instance fails the job), transcoding only when
the peer accepts none of the syntaxes an instance could be sent in.

Orthanc 1.10 has no bind-address option: its HTTP server refuses non-loopback clients
(``RemoteAccessAllowed``), and its DICOM server talks only to the modalities configured here,
from their own address (``DicomCheckModalityHost``; the ``DicomAlwaysAllow*`` defaults turned
off). Neither setting affects the forward job.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.conftest import free_port

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
AE_TITLE = "ORTHANC"
#: Job states Orthanc never leaves (GET /jobs/{id} "State"); "Paused" needs an operator.
FINAL_JOB_STATES = ("Success", "Failure", "Paused")
#: Debian's orthanc-dicomweb plugin (STOW-RS, QIDO-RS, WADO-RS under /dicom-web/).
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def available() -> bool:
    return os.access(ORTHANC, os.X_OK)


def dicomweb_available() -> bool:
    return available() and DICOMWEB_PLUGIN.exists()


class OrthancError(AssertionError):
    """A REST call answered with an HTTP error; the message holds Orthanc's own explanation."""


class Orthanc:
    """``with Orthanc(tmp / "orthanc", modalities={"pe": ("PACS_EMBED", port)}) as pacs: ...``"""

    def __init__(
        self,
        directory: Path,
        modalities: dict[str, tuple[str, int]],
        *,
        plugins: Sequence[Path | str] = (),
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """``modalities``: name -> (AE title, port) of the nodes it talks to (and accepts
        C-STOREs from, from 127.0.0.1); ``plugins``: shared libraries to load; ``extra``: more
        top-level configuration keys, e.g. ``{"DicomWeb": {...}}``."""
        self.directory = directory
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.log_path = directory / "orthanc.log"
        self.config = {
            "Name": "pacs-embed-interop",
            "StorageDirectory": str(directory / "storage"),
            "IndexDirectory": str(directory / "storage"),
            # by default not /usr/share/orthanc/plugins: the core is what is under test
            "Plugins": [str(plugin) for plugin in plugins],
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": AE_TITLE,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckModalityHost": True,
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowStore": False,
            "DicomModalities": {
                name: [aet, "127.0.0.1", port] for name, (aet, port) in modalities.items()
            },
            **(extra or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> Orthanc:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "orthanc.json"
        config.write_text(json.dumps(self.config, indent=2))
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [ORTHANC, str(config)],
            cwd=self.directory,
            # DCMTK inside Orthanc 1.10 leaves Nagle on: ~40 ms per instance on loopback without.
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get("/system")
                return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"Orthanc did not start\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb service root of the plugin (``plugins=[DICOMWEB_PLUGIN]``)."""
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    # -- REST ---------------------------------------------------------------------------------
    def _call(self, method: str, path: str, body: bytes | None, content_type: str) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method
        )
        if body is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback
                return json.load(response)
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")
            try:
                doc = json.loads(body)
                body = ": ".join(str(doc[k]) for k in ("Message", "Details") if doc.get(k))
            except (ValueError, AttributeError):
                pass
            raise OrthancError(f"{method} {path}: HTTP {exc.code} {body}") from None

    def get(self, path: str) -> Any:
        return self._call("GET", path, None, "")

    def post(self, path: str, payload: Any) -> Any:
        return self._call("POST", path, json.dumps(payload).encode(), "application/json")

    def upload(self, path: Path) -> dict[str, Any]:
        """POST /instances: {"ID", "Status": "Success" | "AlreadyStored", ...}."""
        return dict(self._call("POST", "/instances", path.read_bytes(), "application/dicom"))

    def instances(self) -> list[str]:
        return list(self.get("/instances"))

    def store(
        self, modality: str, resources: list[str], *, synchronous: bool = False
    ) -> dict[str, Any]:
        """POST /modalities/{modality}/store with Orthanc's defaults (non-permissive).

        Asynchronous: returns {"ID": job id, "Path"}; synchronous: the finished job's content
        ({"InstancesCount", "FailedInstancesCount", ...}), or OrthancError when it failed.
        """
        body = {"Resources": resources, "Synchronous": synchronous}
        return dict(self.post(f"/modalities/{modality}/store", body))

    def wait_job(self, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
        """GET /jobs/{id} until it is final; returns the job document ("State", "Content", ...)."""
        deadline = time.monotonic() + timeout
        while True:
            job = dict(self.get(f"/jobs/{job_id}"))
            if job["State"] in FINAL_JOB_STATES:
                return job
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"Orthanc exited during job {job_id}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['State']} after {timeout} s: {job}")
            time.sleep(0.1)

    def forward(
        self, modality: str, resources: list[str], timeout: float = 120.0
    ) -> dict[str, Any]:
        """The forward a PACS operator starts: an asynchronous store job, awaited."""
        return self.wait_job(str(self.store(modality, resources)["ID"]), timeout)
