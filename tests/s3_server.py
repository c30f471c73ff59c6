"""A real S3-compatible store on the loopback address for the tests: moto's server in its own process
(started and stopped by the test; nothing is left listening), and the environment a client needs to
find it (AWS_ENDPOINT_URL, fake keys with a recognisable secret the tests look for in every output)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

SECRET = "resure-FAKE-secret-7f3a9c"  # must never appear in a run folder, a manifest or a log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Store:
    """A running server: url, env (for subprocesses), client (boto3, for setting up and editing),
    requests() (the request lines it has logged)."""

    def __init__(self, port: int, proc: subprocess.Popen, log: str):
        self.port, self.proc, self.log = port, proc, log
        self.url = f"http://127.0.0.1:{port}"
        self.env = {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "AKIARESUREFAKE",
                    "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=SECRET, region_name="us-east-1")

    def upload_folder(self, local: str, bucket: str, prefix: str) -> None:
        c = self.client()
        for root, _, files in os.walk(local):
            for f in files:
                path = os.path.join(root, f)
                c.upload_file(path, bucket, f"{prefix}/{os.path.relpath(path, local)}")

    def requests(self) -> list[str]:
        """'GET /bucket/key' for every request served so far."""
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return [m.group(1) for ln in f if (m := re.search(r'"([A-Z]+ /[^ ?"]*)', ln))]

    def with_user(self) -> dict:
        """For a server started with auth=True: the environment of a user with real keys (moto's IAM)."""
        import boto3

        iam = boto3.client("iam", endpoint_url=self.url, aws_access_key_id="x", aws_secret_access_key="y",
                           region_name="us-east-1")
        iam.create_user(UserName="trainer")
        iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        return {**self.env, "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out = self.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for o in out.get("Contents", []))


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with status {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=2).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("moto_server did not answer within a minute")


@contextlib.contextmanager
def s3_store(log_dir: str, auth: bool = False):
    """A fresh, empty store for the with-block, its request log in log_dir; its process is killed on
    the way out. auth: credentials are checked (after the 3 requests with_user() makes)."""
    port = free_port()
    log = os.path.join(log_dir, f"moto-{port}.log")
    env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "3"} if auth else {})}
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_ready(f"http://127.0.0.1:{port}", proc)
        yield Store(port, proc, log)
    finally:
        proc.kill()
        proc.wait(timeout=30)


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0
