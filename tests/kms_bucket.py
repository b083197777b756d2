"""An S3 bucket that answers like a real SSE-KMS (or SSE-C) bucket, on the moto server of tests/moto_s3.py.

Real S3 gives an object encrypted with SSE-KMS or SSE-C an ETag that is NOT the MD5 of its content (and a
multipart object an ETag with a ``-N`` suffix); moto computes every ETag as the MD5 whatever the encryption.
``kms_etags()`` makes moto's keys that carry SSE-KMS (the bucket's default encryption, or ``aws:kms`` on the
PUT) answer with a random 32-hex ETag, fixed per stored object, in every answer (PUT, HEAD, GET, listings,
If-Match), as S3 does; ``kms_bucket(fs, name)`` creates a bucket whose default encryption is ``aws:kms``, so
every object put there (by a plain ``put_file`` / ``pipe_file``) is encrypted: HEAD and GET answer
``x-amz-server-side-encryption: aws:kms``. moto's server runs in this process (a thread), so the patch
applies to it.
"""
import contextlib
import uuid


@contextlib.contextmanager
def kms_etags():
    """While active, SSE-KMS objects of the in-process moto server have non-MD5 ETags."""
    from moto.s3.models import FakeKey

    real = FakeKey.etag

    def etag(self):
        if getattr(self, "encryption", None) in ("aws:kms", "aws:kms:dsse"):
            if getattr(self, "_kbatch_kms_etag", None) is None:
                self._kbatch_kms_etag = uuid.uuid4().hex  # 32 hex digits, like an MD5, but not the content's
            return f'"{self._kbatch_kms_etag}"'
        return real.fget(self)

    FakeKey.etag = property(etag)
    try:
        yield
    finally:
        FakeKey.etag = real


def kms_bucket(fs, name: str) -> None:
    """Create bucket ``name`` with default encryption SSE-KMS (through ``fs``'s own S3 client)."""
    fs.mkdir(name)
    fs.call_s3("put_bucket_encryption", Bucket=name, ServerSideEncryptionConfiguration={
        "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms"}}]})
