"""What kbatch owns at an output root, and ``--overwrite``'s removal of exactly that.

A folder that holds other things next to a kbatch output never loses them: only :data:`OWNED_ENTRIES` are
removed, the completion marker and commit records first.
"""
from __future__ import annotations

import os

from kbatch.storage.paths import TMP_MARK, get_fs, is_local, join


# What kbatch writes at an output root; remove_tree deletes only these (commit markers first), so pointing
# --overwrite at a folder that holds other things never deletes them.
OWNED_ENTRIES = ("_SUCCESS", "_commits", "_job.json", "meta", "stats", "images", "tars", "data", "gallery",
                 "gallery.html", "contact_sheet.png")


def remove_tree(uri_root: str, storage_options: dict | None = None) -> list[str]:
    """Delete the kbatch outputs at ``uri_root`` (``--overwrite``); returns the entries removed.

    Only kbatch's own entries are removed (:data:`OWNED_ENTRIES`): the completion marker and commit records
    first, so that readers never see a committed shard with its data gone; other files are left alone.
    """
    fs, root = get_fs(uri_root, storage_options)
    if root in ("", "/"):
        raise ValueError(f"refusing to remove outputs at the filesystem root {uri_root!r}")
    removed = []
    for name in OWNED_ENTRIES:
        path = join(root, name)
        try:
            fs.invalidate_cache(path)
        except Exception:  # noqa: BLE001
            pass
        if not fs.exists(path):
            continue
        if fs.isdir(path):
            fs.rm(path, recursive=True)
        else:
            fs.rm_file(path)
        removed.append(name)
    # temp files of an interrupted atomic write of a top-level entry (local disks only)
    if is_local(fs) and os.path.isdir(root):
        for name in os.listdir(root):
            if TMP_MARK in name and name.split(TMP_MARK, 1)[0] in OWNED_ENTRIES:
                os.unlink(os.path.join(root, name))
    try:
        fs.invalidate_cache(root)
    except Exception:  # noqa: BLE001
        pass
    return removed
