"""A real S3-compatible server on 127.0.0.1 for the tests: moto's threaded server, in this
process, on a free port. Requests go over real HTTP (botocore/aiobotocore → werkzeug), so Ray
workers in other processes reach it too.

Authentication: moto accepts any credentials until IAM checks are switched on
(:meth:`S3Server.iam_auth`, moto's ``/moto-api/reset-auth``); then requests must be signed by
an IAM user created here, and that user's policies (including ``Deny`` on a prefix) are
enforced: this is how a real 403 on one expert is produced. Limitation found in moto 5.2:
with IAM checks on, a signed ListObjects whose query holds a ``/`` (``prefix=a/``,
``delimiter=/``) fails with SignatureDoesNotMatch, so tests under :meth:`iam_auth` use
single-file models (HEAD and GET only, no listing).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

DUMMY = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
REGION = "us-east-1"


class S3Server:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)   # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def stop(self) -> None:
        self._server.stop()

    def client(self, service: str = "s3", **creds):
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            **(creds or DUMMY))

    def create_bucket(self, name: str, *, public_read: bool = False) -> None:
        """A bucket; ``public_read``: anonymous requests may list and read it (a bucket policy)."""
        s3 = self.client()
        s3.create_bucket(Bucket=name)
        if public_read:
            s3.put_bucket_policy(Bucket=name, Policy=json.dumps({
                "Version": "2012-10-17",
                "Statement": [{
                    "Effect": "Allow", "Principal": "*",
                    # moto names a HEAD "s3:HeadObject" in bucket policies (AWS: s3:GetObject)
                    "Action": ["s3:GetObject", "s3:HeadObject", "s3:ListBucket"],
                    "Resource": [f"arn:aws:s3:::{name}", f"arn:aws:s3:::{name}/*"],
                }],
            }))

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> str:
        """Every file of ``folder`` under ``prefix``; returns the folder's ``s3://`` URL."""
        s3 = self.client()
        for f in sorted(Path(folder).iterdir()):
            if f.is_file():
                s3.put_object(Bucket=bucket, Key=f"{prefix}/{f.name}", Body=f.read_bytes())
        return f"s3://{bucket}/{prefix}"

    def put(self, bucket: str, key: str, data: bytes) -> str:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)
        return f"s3://{bucket}/{key}"

    def create_user(self, name: str, statements: list[dict]) -> tuple[str, str]:
        """An IAM user with an inline policy; returns its (access key id, secret key)."""
        iam = self.client("iam")
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": statements}))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    @contextlib.contextmanager
    def iam_auth(self) -> Iterator[None]:
        """Within the block, every request must be signed by an IAM user and is checked
        against its policies (403 otherwise)."""
        import requests

        requests.post(f"{self.endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
        try:
            yield
        finally:
            requests.post(f"{self.endpoint}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()
