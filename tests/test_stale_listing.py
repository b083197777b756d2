"""A process that read an output on S3 (``kbatch status``'s summarize, ``open_results``) reads it again after more
shards landed: kbatch's listings leave nothing cached that makes a newer object look missing (s3fs answers reads
of a folder it listed from that listing). Found by bench/chaos.py; moto, no Ray."""
import subprocess
import sys

import numpy as np
import s3fs

import kbatch
from kbatch.run.status import summarize

from moto_s3 import aws_env, moto_server

WRITE = r'''
import sys, numpy as np
from kbatch.output.writer import OutputSpec, write_shard
root, shard = sys.argv[1], sys.argv[2]
recs = [{"id": f"{shard}-{i}", "image_index": 0, "status": "ok", "prompt": "p", "seed": 1} for i in range(2)]
write_shard(OutputSpec(root, "parquet", "png"), shard, recs, [np.zeros((8, 8, 3), np.uint8)] * 2)
'''


def test_reads_again_after_a_new_shard_in_the_same_process():
    with moto_server(aws_env("AKIASTALE", "secret")):
        s3fs.S3FileSystem().mkdir("bkt-stale")
        root = "s3://bkt-stale/out"
        subprocess.run([sys.executable, "-c", WRITE, root, "a-00000"], check=True)  # another process writes
        assert summarize(root)["rows_done"] == 2
        assert len(kbatch.open_results(root).df) == 2
        subprocess.run([sys.executable, "-c", WRITE, root, "b-00000"], check=True)  # one more shard lands
        assert summarize(root)["rows_done"] == 4
        assert sorted(kbatch.open_results(root).df["id"]) == ["a-00000-0", "a-00000-1", "b-00000-0", "b-00000-1"]
