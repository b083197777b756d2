"""What can go wrong while staging or pulling model weights, as exceptions that cross processes intact.

Every class here pickles round-trip with its type, message and fields (Ray carries an exception raised in an
actor back to the driver by pickling it; one that does not unpickle reaches the user as
``UnserializableException``, its message lost). Classes over ``OSError`` keep their errno and define
``__reduce__``, since their one-argument ``__init__`` differs from ``OSError``'s ``args``.
"""
from __future__ import annotations

import errno


class ChecksumMismatch(OSError):
    """A downloaded file differs from what the source says it holds (size, MD5, or the pull manifest's
    sha256): downloaded again (transient)."""

    def __init__(self, msg: str):
        super().__init__(errno.EIO, msg)

    def __reduce__(self):
        return (type(self), (self.strerror,))


class NotEnoughSpace(OSError):
    """The node's model cache has too little free space for the copy (permanent)."""

    def __init__(self, msg: str):
        super().__init__(errno.ENOSPC, msg)

    def __reduce__(self):
        return (type(self), (self.strerror,))


class PullInProgress(RuntimeError):
    """A model folder's pull manifest says ``kbatch models pull`` is writing it (or was interrupted): staging
    it now could mix two versions (permanent: the message names the pull)."""


class StagingStalled(TimeoutError):
    """Waited for the node's staging lock while its holder made no progress (stopped or frozen): the message
    names the holder's host and pid."""
