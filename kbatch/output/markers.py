"""``_job.json`` and ``_SUCCESS``: written only by the lease holder, each write conditional; read by one rule.

Promises (docs/output.md, "_job.json and _SUCCESS"):

- **Writing** (:class:`Markers`, through :meth:`kbatch.output.lease.Lease.write` / ``remove``): after a lease
  check, a marker this run has not seen yet is *created* if absent (the first ``_job.json`` never overwrites
  one that appeared meanwhile); one it has seen is *replaced if* it still holds the version this run last read
  or wrote; a removal is a delete-if-version. A condition that fails means another writer got there: the lease
  is read again (:class:`~kbatch.output.lease.LeaseLost` when it is another run's: nothing is written), and
  only while it is still this run's is the marker read again and the write retried, conditional again. A run
  that takes a lease over first rewrites ``_job.json`` (:meth:`Markers.mark_taken_over`), so an old holder
  frozen between its lease check and its write fails its condition.
- **Reading** (:func:`complete`): ``_SUCCESS`` counts only when it names the run ``_job.json`` names and that
  ``_job.json`` says ``status: complete``; its mere existence proves nothing (an old holder's late marker, a
  marker left by a run whose ``_job.json`` was since replaced).
"""
from __future__ import annotations

from typing import Any

from kbatch import storage
from kbatch.output.job_file import JOB_FILE, SUCCESS_FILE
from kbatch.storage import dumps_json
from kbatch.storage.conditional import PreconditionFailed

_ATTEMPTS = 10
_UNSEEN = object()


class Markers:
    """The holder's conditional writes of ``_job.json`` / ``_SUCCESS`` (module docstring)."""

    def __init__(self, store, lease):
        self.store, self.lease = store, lease
        self._versions: dict[str, Any] = {}  # name -> version last read or written (None: seen absent)

    def _name(self, name: str) -> str:
        return storage.check_relative(name)

    def read_json(self, name: str) -> dict | None:
        """The marker as JSON (None if absent or not a JSON object), remembering its version."""
        name = self._name(name)
        seen = self.store.read(name)
        self._versions[name] = None if seen is None else seen.version
        return None if seen is None else seen.json_object()

    def _refresh(self, name: str) -> None:
        seen = self.store.read(name)
        self._versions[name] = None if seen is None else seen.version

    def write(self, name: str, data: bytes) -> None:
        name = self._name(name)
        self.lease.verify()
        if self._versions.get(name, _UNSEEN) is _UNSEEN:
            self._refresh(name)
        for _ in range(_ATTEMPTS):
            version = self._versions[name]
            try:
                if version is None:
                    self._versions[name] = self.store.create(name, data)
                else:
                    self._versions[name] = self.store.replace(name, data, version)
                return
            except PreconditionFailed:
                self.lease.verify()  # another run's now: LeaseLost, nothing written
                self._refresh(name)  # still ours: an old holder's late write, or a person's edit
        raise OSError(f"{name} at {self.store.url} kept changing under {_ATTEMPTS} conditional writes")

    def remove(self, name: str) -> None:
        name = self._name(name)
        self.lease.verify()
        for _ in range(_ATTEMPTS):
            self._refresh(name)
            version = self._versions[name]
            if version is None:
                return
            try:
                self.store.delete(name, version)
                self._versions[name] = None
                return
            except PreconditionFailed:
                self.lease.verify()
        raise OSError(f"{name} at {self.store.url} kept changing under {_ATTEMPTS} conditional deletes")

    def mark_taken_over(self, previous: dict) -> None:
        """After a takeover: note it in ``_job.json`` (a replace-if-version), which makes the old holder's
        next conditional write of it fail. Nothing to mark when there is no ``_job.json``."""
        for _ in range(_ATTEMPTS):
            job = self.read_json(JOB_FILE)
            version = self._versions.get(JOB_FILE)
            if job is None or version is None:
                return
            job["lease_taken_over"] = {"by": self.lease.run_id, "epoch": self.lease.epoch,
                                       "from": previous.get("run_id")}
            try:
                self._versions[JOB_FILE] = self.store.replace(JOB_FILE, dumps_json(job), version)
                return
            except PreconditionFailed:
                continue  # the old holder wrote it just now: read it again


def complete(job: dict | None, success: dict | None) -> bool:
    """The output is complete by its markers: ``_SUCCESS`` names the run of ``_job.json``, whose status is
    complete."""
    return (isinstance(job, dict) and isinstance(success, dict) and job.get("status") == "complete"
            and bool(job.get("run_id")) and success.get("run_id") == job.get("run_id"))


def read_marker(root: str, name: str, storage_options: dict | None = None) -> dict | None:
    """``<root>/<name>`` as a JSON object (None: absent, or not a JSON object)."""
    try:
        obj = storage.read_json(root, name, storage_options)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def read_markers(root: str, storage_options: dict | None = None) -> tuple[dict | None, dict | None]:
    """``(_job.json, _SUCCESS)`` of ``root``, in that order (a run replaces ``_job.json`` before it removes
    ``_SUCCESS``, so a pair read this way never looks complete across two runs)."""
    return read_marker(root, JOB_FILE, storage_options), read_marker(root, SUCCESS_FILE, storage_options)


def is_complete(root: str, storage_options: dict | None = None) -> bool:
    """:func:`complete` of the markers at ``root``."""
    return complete(*read_markers(root, storage_options))
