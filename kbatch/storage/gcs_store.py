"""The conditional-write backend of Google Cloud Storage: generation preconditions (GCS JSON API, via gcsfs).

- **create**: a multipart upload with ``ifGenerationMatch=0`` (412 when the object exists);
- **replace**: a multipart upload with ``ifGenerationMatch=<generation>``;
- **delete**: the generation is read and compared first, then ``DELETE`` with ``ifGenerationMatch``: GCS
  itself refuses a stale delete; the read in front keeps a server that ignores delete preconditions (the
  fake-gcs-server emulator does) to a short read-then-delete window, as ``s3_store.py`` on S3 servers
  without conditional deletes;
- the version is the object's generation, from the same ``GET`` answer as the bytes (``x-goog-generation``).

Requests go through gcsfs's authenticated session (its credentials, endpoint and retries;
``STORAGE_EMULATOR_HOST`` or ``storage_options: {endpoint_url: ...}`` for an emulator). Lost answers are
settled by ``conditional.py``'s rule. Interface: ``conditional.py``; which stores work: docs/output.md.
"""
from __future__ import annotations

import contextlib
import email.utils
import json

from kbatch.storage.conditional import BaseStore, PreconditionFailed, Versioned

_BOUNDARY = "==kbatch-0=="


def gcs_endpoint(fs) -> str:
    return str(getattr(fs, "_location", None) or "https://storage.googleapis.com")


class GCSStore(BaseStore):
    """Conditional writes under ``gs://<root>`` through a synchronous gcsfs instance ``fs``."""

    def __init__(self, fs, root: str):
        if getattr(fs, "asynchronous", False):
            raise ValueError("kbatch's conditional writes need a synchronous gcsfs instance")
        self.fs = fs
        self.root = str(root).strip("/")
        self.bucket, _, key = self.root.partition("/")
        self.base = f"{key}/" if key else ""
        self.url = f"gs://{self.root}"

    @property
    def server(self) -> str:
        return f"GCS endpoint {gcs_endpoint(self.fs)}"

    def _key(self, name: str) -> str:
        return self.base + name

    def _invalidate(self, name: str) -> None:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(f"{self.root}/{name}")

    def _read(self, name: str) -> Versioned | None:
        try:
            headers, body = self.fs.call("GET", "b/{}/o/{}", self.bucket, self._key(name), alt="media")
        except FileNotFoundError:
            return None
        generation = headers.get("x-goog-generation")
        if not generation:
            raise OSError(f"{self.url}/{name}: the server sent no x-goog-generation header")
        modified = None
        with contextlib.suppress(TypeError, ValueError):
            modified = email.utils.parsedate_to_datetime(headers.get("Last-Modified")).timestamp()
        return Versioned(bytes(body), str(generation), modified)

    def _upload(self, name: str, data: bytes, generation: str) -> str:
        meta = json.dumps({"name": self._key(name)}).encode()
        body = (f"--{_BOUNDARY}\nContent-Type: application/json; charset=UTF-8\n\n".encode() + meta
                + f"\n--{_BOUNDARY}\nContent-Type: application/octet-stream\n\n".encode() + data
                + f"\n--{_BOUNDARY}--".encode())
        try:
            out = self.fs.call("POST", f"{self.fs._location}/upload/storage/v1/b/{self.bucket}/o",
                               uploadType="multipart", ifGenerationMatch=generation, data=body, json_out=True,
                               headers={"Content-Type": f'multipart/related; boundary="{_BOUNDARY}"'})
        except FileExistsError:  # gcsfs's translation of 412
            raise PreconditionFailed(f"{self.url}/{name}: ifGenerationMatch={generation} failed") from None
        except FileNotFoundError:  # the bucket is gone
            raise
        finally:
            self._invalidate(name)
        return str(out["generation"])

    def _create(self, name: str, data: bytes) -> str:
        return self._upload(name, data, "0")

    def _replace(self, name: str, data: bytes, version: str) -> str:
        return self._upload(name, data, version)

    def _delete(self, name: str, version: str) -> None:
        current = self._read(name)
        if current is None:
            return
        if current.version != version:
            raise PreconditionFailed(f"{self.url}/{name} is not at generation {version}")
        try:
            self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self._key(name), ifGenerationMatch=version)
        except FileNotFoundError:
            return
        except FileExistsError:
            raise PreconditionFailed(f"{self.url}/{name} is not at generation {version}") from None
        finally:
            self._invalidate(name)

    def list(self, prefix: str = "") -> list[str]:
        names, token = [], None
        while True:
            out = self.fs.call("GET", "b/{}/o", self.bucket, prefix=self.base + prefix, pageToken=token,
                               fields="items(name),nextPageToken", json_out=True)
            names += [item["name"][len(self.base):] for item in out.get("items", [])]
            token = out.get("nextPageToken")
            if not token:
                break
        return sorted(n for n in names if n and not n.endswith("/"))
