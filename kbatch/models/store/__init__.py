"""Where model weights come from, checked before a job starts and copied once per node (docs/models.md).

A ``models.*`` value is one of:

- ``sim``: simulated models, never checked or staged;
- a local folder in diffusers layout (``local``): loaded as it is;
- an fsspec URL (``url``: ``s3://``, ``gs://``, ...): the first process of a node that needs it copies the
  folder into a node-local cache (``models.cache_dir``) under a file lock; every other process of that node
  waits and loads the same copy. Why: hundreds of decoder actors that each download ~7 GB from a hub hit rate
  limits, and a transient 429 would retire an actor for good; a fleet stages the weights once in its own
  bucket (``kbatch models pull``) and reads them from local disk.
- a hub id (``hub``: ``owner/name``): huggingface_hub downloads it into its own cache (which has its own
  locks), safetensors and configs only.

The package, one idea per file: ``sources`` (what a value is, which files travel), ``checks`` (before a job),
``retries``, ``integrity`` (versions, MD5s, hashes), ``cache`` (the node-local cache), ``staging`` (a folder
made loadable on this node), ``same_weights``, ``manifest`` (what a pull records), ``pull`` (``kbatch models
pull``), ``errors``. This module
re-exports the names callers use. Nothing here imports torch: the driver checks models with it.
"""
from kbatch.models.store.cache import JOURNAL, default_cache_dir, listing_signature
from kbatch.models.store.checks import check_model
from kbatch.models.store.errors import ChecksumMismatch, NotEnoughSpace, PullInProgress, StagingStalled
from kbatch.models.store.pull import pull_model
from kbatch.models.store.retries import is_transient, with_retries
from kbatch.models.store.same_weights import file_sha256, known_sha256, same_weights
from kbatch.models.store.sources import (CONFIG_SUFFIXES, HUB_PATTERNS, HUB_TIMEOUT, UNSAFE_WEIGHT_SUFFIXES, is_sim,
                                         model_kind, safe_name, wanted)
from kbatch.models.store.manifest import PULL_MANIFEST
from kbatch.models.store.staging import Staged, stage, stage_model

__all__ = ["CONFIG_SUFFIXES", "HUB_PATTERNS", "HUB_TIMEOUT", "JOURNAL", "PULL_MANIFEST", "UNSAFE_WEIGHT_SUFFIXES",
           "ChecksumMismatch", "NotEnoughSpace", "PullInProgress", "Staged", "check_model", "default_cache_dir",
           "file_sha256", "is_sim", "is_transient", "known_sha256", "listing_signature", "model_kind", "pull_model",
           "safe_name", "same_weights", "stage", "stage_model", "StagingStalled", "wanted", "with_retries"]
