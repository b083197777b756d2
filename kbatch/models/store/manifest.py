"""The pull manifest ``.kbatch-manifest.json``: what ``kbatch models pull`` says about the folder it wrote.

Promises (docs/models.md): a pull writes the manifest with ``state: pulling`` (and who pulls: id, source, host,
pid, start time) BEFORE it uploads anything, and with ``state: complete`` after the last file; so a folder
whose manifest says ``pulling`` is mid-pull or was left by an interrupted pull, and staging or the start-up
check refuse it by naming that pull rather than copy a mix of two versions. Each file's entry holds its size,
sha256 and the version of the object the pull wrote or found (S3 ETag, GCS etag/generation, mtime): a later
pull trusts a recorded sha256 only while the object is still that version (an interrupted pull that replaced
it with other bytes of the same size changed its version). Manifests of older kbatch versions (no ``state``)
are complete; their entries have no version, so a pull never trusts their sha256 to skip an upload.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field

from kbatch.models.store.errors import PullInProgress

log = logging.getLogger("kbatch")

#: Written by ``pull_model`` beside the files: their sizes, sha256 and versions, and the pull's state.
PULL_MANIFEST = ".kbatch-manifest.json"
PULLING, COMPLETE = "pulling", "complete"


@dataclass
class PullManifest:
    state: str = COMPLETE
    files: dict[str, dict] = field(default_factory=dict)  # rel -> {size, sha256, version?}
    pull: dict = field(default_factory=dict)  # id, source, revision, host, pid, started

    @property
    def pull_id(self) -> str | None:
        return self.pull.get("id")

    def to_json(self) -> bytes:
        return json.dumps({"format": 2, "state": self.state, "pull": self.pull, "files": self.files}, indent=1,
                          sort_keys=True).encode()

    def describe(self) -> str:
        """The pull, as a user can find it: ``kbatch models pull`` of which source, id, host, pid, start."""
        p = self.pull
        return (f"kbatch models pull of {p.get('source')!r} (pull {p.get('id')}, host {p.get('host')}, pid "
                f"{p.get('pid')}, started {p.get('started')})")


def new_pull(source: str, revision: str | None) -> dict:
    """Who is pulling, written into the manifest before any upload."""
    return {"id": uuid.uuid4().hex[:12], "source": source, "revision": revision, "host": socket.gethostname(),
            "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def parse(data: bytes) -> PullManifest:
    raw = json.loads(data)
    return PullManifest(state=raw.get("state", COMPLETE), files=dict(raw.get("files") or {}),
                        pull=dict(raw.get("pull") or {}))


def read_manifest(fs, root: str, listing: dict | None = None) -> PullManifest | None:
    """The folder's manifest, or None (none there; or unreadable: only a check is lost, with a warning).
    ``listing``: when given, a manifest it does not list is not read."""
    if listing is not None and PULL_MANIFEST not in listing:
        return None
    try:
        return parse(fs.cat_file(f"{root.rstrip('/')}/{PULL_MANIFEST}"))
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - an unreadable manifest only loses a check
        log.warning("ignoring unreadable %s under %s (%s)", PULL_MANIFEST, root, e)
        return None


def refuse_if_pulling(uri: str, manifest: PullManifest | None) -> None:
    """:class:`PullInProgress` naming the pull when ``manifest`` says a pull is writing the folder (or was
    interrupted): loading it now could mix two versions."""
    if manifest is not None and manifest.state != COMPLETE:
        raise PullInProgress(f"{uri}: {manifest.describe()} is writing this folder, or was interrupted; its "
                             f"files may mix two versions. Wait for that pull to finish, or run it again to "
                             f"complete it")
