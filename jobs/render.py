"""Entry point for ``ray job submit --working-dir . -- python jobs/render.py --config configs/X.yaml``.

Takes the same options as ``kbatch run`` (--manifest, --output, --set, --overwrite, --retry-failed,
--progress) and exits with the same codes: 0 complete, 1 failed rows above tolerance, 2 config error,
3 incomplete, interrupted or an unexpected error. Its last line is ``kbatch-exit-code: N``: ``ray job submit``
itself exits 1 for any failed job, so ``kbatch submit --wait`` (and ``JobHandle``) read kbatch's code from
the output's ``_job.json`` or from this line. Storage credentials come from the environment variable
``KBATCH_STORAGE_OPTIONS`` (JSON) or the cluster's own, never from the command line.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the working_dir

from kbatch.cli import job_entrypoint  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_entrypoint(sys.argv[1:]))
