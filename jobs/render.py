"""Entry point for ``ray job submit --working-dir . -- python jobs/render.py --config configs/X.yaml``.

Takes the same options as ``kbatch run`` (--manifest, --output, --set, --overwrite, --progress) and exits
with the same codes: 0 complete, 1 failed rows above tolerance, 2 config error, 3 incomplete.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the working_dir

from kbatch.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["job"] + sys.argv[1:]))
