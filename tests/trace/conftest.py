"""Shared fixtures: the bundled V3-style model, loaded once (the trace tests of schema 1.1; V4 stores, schema 1.2,
have their own tests in test_v4_trace.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from workbench.loader import LoadedModel, load_model


@pytest.fixture(scope="session")
def loaded() -> LoadedModel:
    return load_model("default-v3")


class S3:
    """A bucket on moto's S3 server on 127.0.0.1, and the storage options that reach it."""

    def __init__(self, endpoint: str, bucket: str) -> None:
        self.endpoint, self.bucket = endpoint, bucket
        self.options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing", "region": "us-east-1"}

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{name}-{uuid.uuid4().hex[:8]}.zarr"

    def keys(self, url: str) -> list[str]:
        import obstore

        from workbench.trace.storage import storage_for

        return [m["path"] for batch in obstore.list(storage_for(url, self.options).store) for m in batch]


@pytest.fixture(scope="session")
def s3() -> Iterator[S3]:
    """moto's threaded S3 server on loopback (no network, no credentials beyond moto's test ones)."""
    pytest.importorskip("obstore")
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="traces")
    try:
        yield S3(endpoint, "traces")
    finally:
        server.stop()
