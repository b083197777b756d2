"""The bounds between stages: small policies the driver asks before it starts more work.

Every queue between two stages has a limit, so the driver's memory and the object store hold a bounded
amount whatever the size of the manifest, and a fast stage cannot run away from a slow one:

| bound | what it limits | config (default) |
|---|---|---|
| plan | manifest rows read and validated but not yet given to the prior | 2 x ``resources.plan_window`` (4096) |
| load | input-loading batches running or loaded but not yet at the prior (decoded images in the object store) | ``resources.load_ahead`` (2) per prior replica |
| prior | images past the prior not yet at a decoder (embeddings waiting), plus prior batches running | ``resources.prior_ahead`` (2) decoder batches per decoder replica |
| write | shards queued at writers; beyond it decoders pause (their images wait in the object store) | ``resources.pending_writes`` (2) per writer |

Each policy takes plain numbers, so it is tested without a cluster.
"""
from __future__ import annotations

from dataclasses import dataclass

from kbatch.config import ResourcesConfig, batch_of


@dataclass
class Bounds:
    res: ResourcesConfig

    def plan(self, planned_rows: int) -> bool:
        """Read another window? ``planned_rows``: rows read but not yet handed to the prior."""
        return planned_rows < 2 * self.res.plan_window

    def load(self, loading: int, loaded: int, prior_replicas: int) -> bool:
        """Start another input-loading batch? ``loading``: in flight; ``loaded``: done, waiting for the prior."""
        return loading + loaded < self.res.load_ahead * max(1, prior_replicas)

    def prior_limit(self, decoder_replicas: int, prior_replicas: int = 1) -> int:
        """Images that may be past the prior and not yet at a decoder, or running in the prior: every prior
        replica past the first may also hold ``max_in_flight`` batches (a split with many priors per decoder,
        ``kbatch.run.balance``, would otherwise leave priors idle)."""
        return (self.res.prior_ahead * max(1, decoder_replicas) * batch_of(self.res.decoder)
                + max(0, prior_replicas - 1) * self.res.max_in_flight * batch_of(self.res.prior))

    def prior(self, ahead_images: int, batch_images: int, decoder_replicas: int, prior_replicas: int = 1) -> bool:
        """Start a prior batch of ``batch_images``? ``ahead_images``: images running in the prior, waiting for
        a decoder batch, or queued for a decoder. Always lets one batch through when nothing is ahead."""
        return ahead_images == 0 or ahead_images + batch_images <= self.prior_limit(decoder_replicas, prior_replicas)

    def write(self, pending: int, writers: int) -> bool:
        """Queue another shard at the writers? (``writers``: those running: none yet, no room.)"""
        return pending < self.res.pending_writes * writers

    def decode(self, pending_writes: int, writers: int, buffered_rows: int, rows_per_shard: int) -> bool:
        """Start a decoder batch? Not while the writers are full and a whole shard already waits for them."""
        return self.write(pending_writes, writers) or buffered_rows < rows_per_shard
