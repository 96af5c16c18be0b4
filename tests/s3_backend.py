"""S3 on SeaweedFS for the tests: a fresh, uniquely named S3 bucket per test.

The bucket contract suite gets ``s3_bucket_factory`` through ``BACKENDS``; the
S3 end-to-end tests use ``s3_client`` and ``fresh_s3_bucket`` directly. Each
test gets its own S3 bucket, so tests never see each other's objects, and the
bucket is emptied and removed afterwards so SeaweedFS stays small.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from sluiceway.buckets.base import Bucket
from sluiceway.buckets.s3 import S3Bucket

from .services import S3Endpoint


def s3_url(endpoint: S3Endpoint, bucket: str, prefix: str = "", **options: str) -> str:
    """The ``s3://`` URL of a bucket on the test endpoint (credentials stay in the env)."""
    query = "&".join(
        f"{k}={v}"
        for k, v in {
            "endpoint_url": endpoint.url,
            "region": endpoint.region,
            "path_style": "true",
            **options,
        }.items()
    )
    path = f"/{prefix}" if prefix else ""
    return f"s3://{bucket}{path}?{query}"


def use_endpoint_credentials(endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials the way users give them: the standard AWS environment variables."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", endpoint.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", endpoint.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", endpoint.region)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


def client_for(endpoint: S3Endpoint) -> Any:
    """A plain boto3 client: "another program" that drops files into S3."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint.url,
        aws_access_key_id=endpoint.access_key,
        aws_secret_access_key=endpoint.secret_key,
        region_name=endpoint.region,
        config=Config(s3={"addressing_style": "path"}),
    )


def unique_bucket_name(stem: str = "t") -> str:
    return f"{stem}-{uuid.uuid4().hex[:12]}"


def create_bucket(request: pytest.FixtureRequest, endpoint: S3Endpoint, stem: str = "t") -> str:
    """Create a uniquely named S3 bucket, removed (with its objects) after the test."""
    client = client_for(endpoint)
    name = unique_bucket_name(stem)
    client.create_bucket(Bucket=name)

    def remove() -> None:
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
                if keys:
                    client.delete_objects(Bucket=name, Delete={"Objects": keys})
            for up in client.list_multipart_uploads(Bucket=name).get("Uploads", ()):
                client.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
            client.delete_bucket(Bucket=name)
        except Exception:  # the endpoint may be gone at session end; nothing to keep
            pass

    request.addfinalizer(remove)
    return name


def s3_bucket_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Bucket:
    """``BACKENDS["s3"]`` of the bucket contract suite: SeaweedFS, a fresh bucket per test."""
    endpoint: S3Endpoint = request.getfixturevalue("s3_endpoint")
    use_endpoint_credentials(endpoint, request.getfixturevalue("monkeypatch"))
    return S3Bucket.from_url("test", s3_url(endpoint, create_bucket(request, endpoint)))
