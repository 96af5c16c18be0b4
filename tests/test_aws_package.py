"""`sluiceway package`: the Lambda zip's structure, its size report, and the image definition.

The quick tests build the zip without Sluiceway's dependencies (the project
and the pipeline only), and install one small binary wheel for each Lambda
architecture from PyPI to show the platform targeting. The full build, with
PyArrow, takes a minute and downloads ~60 MB: it runs only with
``SLUICEWAY_TEST_FULL_PACKAGE=1``.
"""

from __future__ import annotations

import hashlib
import os
import socket
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sluiceway import Pipeline
from sluiceway.aws.package import (
    UNZIPPED_LIMIT,
    _slim,
    build_zip,
    runtime_requirements,
    write_image,
)
from sluiceway.cli import app

PIPELINE = """\
pipeline: pack
imports: [my_steps]
buckets:
  bronze: ./data/bronze
  staging: ./data/staging
queues:
  to-parquet: {}
rules:
  - name: new-csv
    pattern: {detail: {bucket: {name: [bronze]}}}
    targets: [to-parquet]
functions:
  csv-to-parquet:
    queue: to-parquet
    steps:
      - read_csv
      - validate: {schema: schemas/customer.yaml, on_invalid: quarantine}
      - write_parquet: {bucket: staging}
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A pipeline folder with what belongs in the package and what does not."""
    root = tmp_path / "shop"
    (root / "schemas").mkdir(parents=True)
    (root / "sluiceway.yaml").write_text(PIPELINE)
    (root / "schemas" / "customer.yaml").write_text("columns:\n  customer_id: int\n")
    (root / "my_steps.py").write_text("X = 1\n")
    for junk in ("data/bronze/big.csv", ".sluiceway/state.db", "__pycache__/my_steps.pyc"):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_text("not for the package")
    (root / ".venv" / "lib").mkdir(parents=True)
    (root / ".venv" / "lib" / "x.py").write_text("")
    return root / "sluiceway.yaml"


def names(zip_path: Path) -> set[str]:
    with zipfile.ZipFile(zip_path) as z:
        return set(z.namelist())


def test_zip_structure_and_size_report(project: Path, tmp_path: Path) -> None:
    pipeline = Pipeline.from_file(project)
    out = tmp_path / "dist"
    report = build_zip(project, out, config=pipeline.config, dependencies=False)
    pipeline.close()
    assert report.path == out / "sluiceway-lambda.zip"
    inside = names(report.path)
    assert {
        "sluiceway/aws/handler.py",
        "sluiceway/worker.py",
        "pipeline/sluiceway.yaml",
        "pipeline/schemas/customer.yaml",
        "pipeline/my_steps.py",
    } <= inside
    # Local bucket directories, state, caches and virtualenvs stay out.
    assert not any(
        n.startswith(("pipeline/data/", "pipeline/.sluiceway", "pipeline/.venv")) for n in inside
    )
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in inside)
    assert report.files == len(inside)
    assert report.size == report.path.stat().st_size
    assert 0 < report.size < report.unzipped
    limits = {lim.name: lim for lim in report.limits}
    assert limits["unzipped (function + layers)"].limit == UNZIPPED_LIMIT
    assert limits["unzipped (function + layers)"].hard and limits["unzipped (function + layers)"].ok
    assert not limits["zipped, direct upload"].hard
    assert report.ok
    assert any("layer" in w for w in report.warnings)  # built without dependencies

    # Reproducible: the same inputs give the same bytes (a stable source_code_hash).
    first = hashlib.sha256(report.path.read_bytes()).hexdigest()
    again = build_zip(project, out, dependencies=False)
    assert hashlib.sha256(again.path.read_bytes()).hexdigest() == first


def test_runtime_requirements_are_pinned_and_lean() -> None:
    reqs = runtime_requirements()
    by_name = {r.split("==")[0].lower(): r for r in reqs}
    import pyarrow

    assert by_name["pyarrow"] == f"pyarrow=={pyarrow.__version__}"
    assert "boto3" in by_name and "pydantic" in by_name and "watchfiles" in by_name
    assert not {"typer", "rich", "starlette", "uvicorn"} & set(by_name)
    assert all("==" in r for r in reqs)


def test_slim_removes_only_what_never_loads(tmp_path: Path) -> None:
    pa = tmp_path / "pyarrow"
    (pa / "tests").mkdir(parents=True)
    (pa / "include").mkdir()
    for name in ("libarrow_python.so", "libarrow_python.so.2600", "libarrow_python.so.2600.1.0"):
        (pa / name).write_bytes(b"x" * 10)
    (pa / "libarrow_substrait.so.2600").write_bytes(b"needed by lib.so")
    (pa / "libarrow_flight.so.2600").write_bytes(b"only flight needs it")
    (pa / "libother.so").write_bytes(b"a library of its own")
    (pa / "libother.so.1").write_bytes(b"not the same bytes")
    removed = set(_slim(tmp_path))
    assert {"pyarrow/tests", "pyarrow/include", "pyarrow/libarrow_flight.so.2600"} <= removed
    assert {"pyarrow/libarrow_python.so", "pyarrow/libarrow_python.so.2600.1.0"} <= removed
    left = {p.name for p in pa.iterdir()}
    assert left == {
        "libarrow_python.so.2600",
        "libarrow_substrait.so.2600",
        "libother.so",
        "libother.so.1",
    }


def _pypi_reachable() -> bool:
    try:
        with socket.create_connection(("pypi.org", 443), timeout=3):
            return True
    except OSError:
        return False


@pytest.mark.parametrize(("arch", "tag"), [("x86_64", "x86_64"), ("arm64", "aarch64")])
def test_dependencies_are_wheels_for_lambdas_python_and_architecture(
    project: Path, tmp_path: Path, arch: str, tag: str
) -> None:
    if not _pypi_reachable():
        pytest.skip("PyPI is not reachable from here")
    from importlib.metadata import version

    pin = f"pydantic-core=={version('pydantic-core')}"
    report = build_zip(
        project, tmp_path / arch, architecture=arch, dependencies=False, requirements=[pin]
    )
    inside = names(report.path)
    binaries = [n for n in inside if n.startswith("pydantic_core/") and n.endswith(".so")]
    assert binaries == [f"pydantic_core/_pydantic_core.cpython-312-{tag}-linux-gnu.so"]
    assert report.requirements == [pin]
    assert report.architecture == arch


@pytest.mark.skipif(
    os.environ.get("SLUICEWAY_TEST_FULL_PACKAGE") != "1",
    reason="the full build downloads PyArrow (~60 MB): set SLUICEWAY_TEST_FULL_PACKAGE=1",
)
def test_full_package_with_pyarrow_fits_lambda(project: Path, tmp_path: Path) -> None:
    report = build_zip(project, tmp_path / "dist")
    inside = names(report.path)
    assert "pyarrow/lib.cpython-312-x86_64-linux-gnu.so" in inside
    assert any(n.startswith("pyarrow/libarrow_substrait.so.") for n in inside)  # lib.so needs it
    assert "boto3/__init__.py" in inside and "typer/__init__.py" not in inside
    assert report.unzipped < UNZIPPED_LIMIT, report.to_dict()
    assert report.ok


SMOKE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import pyarrow, pyarrow.parquet as pq
from sluiceway import Pipeline
from sluiceway.aws.handler import LambdaApp
assert pyarrow.__file__.startswith(sys.argv[1]), pyarrow.__file__
app = LambdaApp(Pipeline.from_file(sys.argv[2]))
event = {"version": "0", "id": "smoke-1", "source": "sluiceway.bucket",
         "detail-type": "Object Created", "detail": {"bucket": {"name": "bronze"},
         "object": {"key": "in/c.csv", "size": 30, "etag": sys.argv[3]}}}
result = app.handle(event)
print(json.dumps(result.statuses()))
print(pq.read_table(sys.argv[4]).num_rows)
"""


@pytest.mark.skipif(
    os.environ.get("SLUICEWAY_TEST_FULL_PACKAGE") != "1",
    reason="the full build downloads PyArrow (~60 MB): set SLUICEWAY_TEST_FULL_PACKAGE=1",
)
def test_full_package_runs_from_the_zip_alone(project: Path, tmp_path: Path) -> None:
    """Built for this machine's Python, the zip alone (no site-packages) runs a pipeline.

    Lambda's Python is not here, so this proves what the build can: every
    dependency is in the zip, and nothing slimmed away is needed.
    """
    import hashlib
    import subprocess
    import sys

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    report = build_zip(project, tmp_path / "dist", python_version=version)
    root = tmp_path / "task"
    with zipfile.ZipFile(report.path) as z:
        z.extractall(root)
    csv = b"customer_id,name\n1,Ada\n2,Grace\n"
    data = root / "pipeline" / "data" / "bronze" / "in"
    data.mkdir(parents=True)
    (data / "c.csv").write_bytes(csv)
    (root / "pipeline" / "schemas" / "customer.yaml").write_text(
        "columns:\n  customer_id: {type: int}\n  name: string\n"
    )
    out = root / "pipeline" / "data" / "staging" / "in" / "c.parquet"
    done = subprocess.run(
        [sys.executable, "-S", "-c", SMOKE, str(root), str(root / "pipeline" / "sluiceway.yaml"),
         hashlib.md5(csv).hexdigest(), str(out)],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ['["done"]', "2"]


def test_image_definition(project: Path, tmp_path: Path) -> None:
    report = write_image(project, tmp_path / "dist", architecture="arm64")
    context = tmp_path / "dist" / "image"
    dockerfile = (context / "Dockerfile").read_text()
    assert "FROM public.ecr.aws/lambda/python:3.12" in dockerfile
    assert 'CMD ["sluiceway.aws.handler.handler"]' in dockerfile
    assert "ENV SLUICEWAY_PIPELINE=pipeline/sluiceway.yaml" in dockerfile
    assert "--platform linux/arm64" in dockerfile
    reqs = (context / "requirements.txt").read_text().split()
    assert any(r.startswith("pyarrow==") for r in reqs)
    assert (context / "sluiceway" / "aws" / "handler.py").exists()
    assert (context / "pipeline" / "schemas" / "customer.yaml").exists()
    assert not (context / "pipeline" / "data").exists()
    assert report.kind == "image" and report.ok
    assert report.limits[0].limit == 10 * 1024**3


def test_package_command(project: Path, tmp_path: Path) -> None:
    out = tmp_path / "dist"
    result = CliRunner().invoke(
        app,
        ["package", "--pipeline", str(project), "--out", str(out), "--no-deps"],
    )
    assert result.exit_code == 0, result.output
    assert (out / "sluiceway-lambda.zip").exists()
    assert "250.0 MB" in result.output and "unzipped" in result.output
    image = CliRunner().invoke(
        app, ["package", "--pipeline", str(project), "--out", str(out), "--image"]
    )
    assert image.exit_code == 0, image.output
    assert (out / "image" / "Dockerfile").exists()
