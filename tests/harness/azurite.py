"""Azurite's blob service on 127.0.0.1, installed by scripts/test under .tools/azurite."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from harness._net import ManagedServer, free_port, port_open, tail, wait_until

ROOT = Path(__file__).resolve().parents[2]
ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key: public, documented, not a secret.
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def _binary() -> str:
    env = os.environ.get("LOGSLUICE_AZURITE_BIN")
    local = ROOT / ".tools/azurite/node_modules/.bin/azurite-blob"
    found = env or (str(local) if local.exists() else shutil.which("azurite-blob"))
    if not found:
        raise RuntimeError("azurite-blob not found: scripts/test installs it")
    return found


class AzuriteServer(ManagedServer):
    def __init__(self, port: int | None = None):
        self.binary = _binary()
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="logsluice-azurite-"))
        self.data = self.dir / "data"
        self.log = self.dir / "azurite.log"
        self.blob_endpoint = f"http://127.0.0.1:{self.port}/{ACCOUNT}"
        self.connection_string = (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
            f"BlobEndpoint={self.blob_endpoint};"
        )
        self.proc: subprocess.Popen | None = None
        try:
            self.start()
        except BaseException:
            self.close()
            raise

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start (again) on the same port and data location."""
        if self.running:
            return
        argv = [self.binary, "--blobHost", "127.0.0.1", "--blobPort", str(self.port)]
        argv += [
            "--location",
            str(self.data),
            "--skipApiVersionCheck",
            "--loose",
            "--silent",
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() reaches any children too
            )

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"azurite exited ({self.proc.returncode}):\n{tail(self.log)}")
            return port_open(self.port)

        wait_until(ready, 30, f"azurite on port {self.port}", lambda: tail(self.log))

    def stop(self) -> None:
        # SIGTERM lets Azurite save its metadata, so blobs survive a stop()/start().
        if not self.running:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def ensure_running(self) -> None:
        self.start()
