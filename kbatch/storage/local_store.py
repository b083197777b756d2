"""The conditional-write backend of a local folder: exclusive ``link()``, renames under a lock, fsynced.

- **create**: the data goes to a temp file (written and fsynced), which is then hard-linked to the name:
  ``link()`` fails when the name exists, on every node of a shared filesystem too, and the name never shows
  a partial file. The folder is fsynced after, so a committed name survives a power cut.
- **replace / delete**: under an exclusive ``flock`` on ``<name>.lock`` (taken with a timeout: a stopped
  holder makes the others fail with :class:`LockTimeout`, never hang), the current version is compared and
  the new file renamed over the name (or the name unlinked, and its lock file with it); the folder is
  fsynced.
- **network filesystems** (:func:`network_mount` reads ``/proc/mounts``): where a ``flock`` locks per node
  (NFS mounted ``local_lock=flock|all`` or ``nolock``, Lustre with ``localflock``, CIFS/SMB, 9p, Ceph,
  GPFS, BeeGFS, GlusterFS, FUSE mounts...), two drivers on two nodes could both replace the same lease.
  ``create`` (``link()``) stays exclusive, but replace and delete (the lease, ``_job.json``) are refused
  with :class:`NetworkFilesystemUnsupported` (a ``ConfigError``: exit 2) naming the mount and its type;
  the probe (``probe.py``) raises it when a run acquires its output. NFS with its default server-side
  locks and Lustre mounted ``flock`` are trusted.

A version is the file's inode, modification time, size and content hash, read from one open file.
Interface: ``conditional.py``; which stores work: docs/output.md.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import stat
import time
import uuid

from kbatch.config import ConfigError
from kbatch.storage.conditional import BaseStore, PreconditionFailed, Versioned
from kbatch.storage.paths import TMP_MARK

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_SUFFIX = ".lock"
LOCK_TIMEOUT = 60.0

#: filesystem types whose locks or renames are not one node's: a lease there cannot be fenced by flock
NETWORK_FS_TYPES = frozenset({
    "nfs", "nfs4", "lustre", "cifs", "smb", "smb2", "smb3", "smbfs", "9p", "ceph", "cephfs", "gpfs", "beegfs",
    "glusterfs", "afs", "ocfs2", "gfs2", "panfs", "orangefs", "pvfs2", "wekafs", "fuse", "davfs", "ncpfs",
    "virtiofs",
})


class LockTimeout(Exception):
    """A local lock file stayed held by another process for longer than the timeout."""


class NetworkFilesystemUnsupported(ConfigError):
    """The output is on a network filesystem, where kbatch cannot make a lease exclusive across nodes."""


def _unescape(field: str) -> str:
    """/proc/mounts writes spaces, tabs, newlines and backslashes in paths as octal escapes (``\\040``)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1:i + 4]) == 3 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def network_mount(path: str, mounts_text: str) -> tuple[str, str] | None:
    """``(mount point, filesystem type)`` when ``path`` (absolute) is on a network filesystem whose locks are
    not coordinated across nodes, according to ``mounts_text`` (the text of ``/proc/mounts``), else None.
    The mount holding a path is the last-mounted entry with the longest mount point that contains it.

    Trusted: NFS unless mounted ``local_lock=flock|all`` or ``nolock`` (Linux sends an NFS client's ``flock``
    to the server as a whole-file lock, so every node sees it), and Lustre mounted with ``flock`` (not
    ``localflock``). Every other network or FUSE filesystem is refused: its locks are per node or unknown."""
    best: tuple[str, str, set] | None = None
    path = os.path.normpath(path)
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point, fstype = os.path.normpath(_unescape(fields[1])), fields[2].lower()
        options = set(fields[3].split(",")) if len(fields) > 3 else set()
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fstype, options)
    if best is None:
        return None
    point, fstype, options = best
    base = fstype.split(".", 1)[0]  # fuse.sshfs, fuse.gcsfuse, fuse.ceph, ...
    if not (fstype in NETWORK_FS_TYPES or base in NETWORK_FS_TYPES or fstype.startswith("nfs")):
        return None
    if fstype.startswith("nfs") and not options & {"local_lock=flock", "local_lock=all", "nolock"}:
        return None
    if fstype == "lustre" and "flock" in options:
        return None
    return point, fstype


@functools.lru_cache(maxsize=256)
def mount_of(path: str) -> tuple[str, str] | None:
    """This machine's :func:`network_mount` of ``path`` (None where ``/proc/mounts`` does not exist); read
    once per folder and process (writers open a store per shard)."""
    try:
        with open("/proc/mounts", encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    return network_mount(os.path.realpath(path), text)


def network_refusal(path: str, mount: tuple[str, str]) -> str:
    point, fstype = mount
    return (f"output {path} is on a network filesystem ({fstype} mounted at {point}) whose locks are per node "
            "(or unknown), so kbatch cannot make the output lease, _job.json and _SUCCESS exclusive across "
            "nodes there and two runs could both write this output. Write the output to object storage "
            "(s3://, gs://), to NFS mounted with server-side locks (no local_lock, no nolock) or to a "
            "node-local disk (docs/output.md#which-stores-work)")


def fsync_dir(path: str) -> None:
    """fsync a folder, so that names created, renamed or removed in it are on disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems refuse fsync on a folder: nothing more can be done there
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def makedirs_synced(folder: str) -> None:
    """``os.makedirs`` that also fsyncs the parent of each folder it creates."""
    missing = []
    d = os.path.abspath(folder)
    while not os.path.isdir(d):
        missing.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d)
        fsync_dir(os.path.dirname(d))


def _write_temp(path: str, data: bytes) -> tuple[str, str]:
    """A fsynced temp file beside ``path`` holding ``data``: (temp path, the version it will have)."""
    tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
        return tmp, _version(os.fstat(fh.fileno()), data)


def _version(st: os.stat_result, data: bytes) -> str:
    return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}:{hashlib.sha256(data).hexdigest()[:16]}"


class _Held:
    """A held :func:`file_lock`; :meth:`discard` removes its lock file (the name it guards was deleted)."""

    def __init__(self, path: str):
        self.path = path

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


@contextlib.contextmanager
def file_lock(lock_path: str, timeout: float = LOCK_TIMEOUT):
    """Exclusive ``flock`` on ``lock_path`` (created if needed), waited for at most ``timeout`` seconds (then
    :class:`LockTimeout`: a stopped holder never hangs the others). The kernel releases it when its process
    dies. The holder may remove the lock file (``discard()``, after deleting the name it guards): a waiter
    that then gets the lock of the removed file sees that the path is no longer its file and locks anew."""
    if fcntl is None:
        raise ConfigError(f"cannot lock {lock_path}: no fcntl on this platform, so kbatch cannot make writes "
                          "there exclusive; use object storage (s3://, gs://)")
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockTimeout(f"{lock_path} stayed locked by another process for {timeout:g} s "
                                          "(a stopped or frozen kbatch process holds it)") from None
                    time.sleep(pause)
                    pause = min(0.1, pause * 2)
                except OSError as e:
                    raise ConfigError(f"cannot lock {lock_path} ({e}): this filesystem refuses flock, so kbatch "
                                      "cannot make writes there exclusive; use a local disk or object storage "
                                      "(s3://, gs://)") from None
            try:
                current = os.stat(lock_path).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(fd).st_ino:  # discarded while we waited: lock the file now at the path
                continue
            try:
                yield _Held(lock_path)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            return
        finally:
            os.close(fd)


class LocalStore(BaseStore):
    """Conditional writes in a local folder (module docstring). ``mount``: the network mount the folder is
    on (detected from ``/proc/mounts`` when not given; ``False``: none)."""

    def __init__(self, root: str, lock_timeout: float = LOCK_TIMEOUT, mount=None):
        self.root = os.path.abspath(os.path.expanduser(str(root)))
        self.url = self.root
        self.server = f"the local filesystem at {self.root}"
        self.lock_timeout = lock_timeout
        self.mount = mount_of(self.root) if mount is None else (mount or None)

    def check_exclusive(self) -> None:
        """Raise :class:`NetworkFilesystemUnsupported` where replace / delete cannot be exclusive."""
        if self.mount:
            raise NetworkFilesystemUnsupported(network_refusal(self.root, self.mount))

    def _path(self, name: str) -> str:
        return os.path.join(self.root, *name.split("/"))

    def _read(self, name: str) -> Versioned | None:
        try:
            with open(self._path(name), "rb") as fh:
                data = fh.read()
                st = os.fstat(fh.fileno())
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        return Versioned(data, _version(st, data), st.st_mtime)

    def _create(self, name: str, data: bytes) -> str:
        path = self._path(name)
        folder = os.path.dirname(path)
        makedirs_synced(folder)
        tmp, version = _write_temp(path, data)
        try:
            try:
                os.link(tmp, path)  # EEXIST like O_CREAT|O_EXCL, also across NFS nodes; complete before visible
            except FileExistsError:
                raise PreconditionFailed(f"{path} exists") from None
            except OSError:  # no hard links here: exclusive create, then write (readers may see it short)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    raise PreconditionFailed(f"{path} exists") from None
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                    version = _version(os.fstat(fh.fileno()), data)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        fsync_dir(folder)
        return version

    def _locked(self, path: str):
        self.check_exclusive()
        return file_lock(path + LOCK_SUFFIX, self.lock_timeout)

    def _replace(self, name: str, data: bytes, version: str) -> str:
        path = self._path(name)
        if not os.path.lexists(path):
            raise PreconditionFailed(f"{path} does not exist")
        with self._locked(path):
            current = self._read(name)
            if current is None or current.version != version:
                raise PreconditionFailed(f"{path} is not at version {version}")
            tmp, new = _write_temp(path, data)
            try:
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            fsync_dir(os.path.dirname(path))
            return new

    def _delete(self, name: str, version: str) -> None:
        path = self._path(name)
        if not os.path.lexists(path):  # nothing to delete (and no lock file left behind for it)
            return
        with self._locked(path) as held:
            current = self._read(name)
            if current is None:
                return
            if current.version != version:
                raise PreconditionFailed(f"{path} is not at version {version}")
            os.unlink(path)
            held.discard()
            fsync_dir(os.path.dirname(path))

    def list(self, prefix: str = "") -> list[str]:
        start = os.path.join(self.root, *[p for p in prefix.split("/")[:-1] if p])
        out = []
        for folder, _dirs, files in os.walk(start):
            rel = os.path.relpath(folder, self.root)
            for f in files:
                if TMP_MARK in f or f.endswith(LOCK_SUFFIX):
                    continue
                name = f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}"
                if name.startswith(prefix) and stat.S_ISREG(os.lstat(os.path.join(folder, f)).st_mode):
                    out.append(name)
        return sorted(out)
