"""``sluiceway package``: the Lambda deployment package (a zip, or a container image definition).

The zip holds, at its root (Lambda's ``LAMBDA_TASK_ROOT``):

- ``sluiceway/``: this project's code, as installed here;
- ``pipeline/``: the pipeline file's folder (the file, schema files, user
  modules, ``profiles.yaml``), without local bucket directories, the state
  directory, virtualenvs, caches and build output;
- the dependencies, installed by pip **for the Lambda runtime, not for this
  machine**: ``--platform manylinux_2_28_<arch>`` (and the older manylinux
  tags), ``--python-version 3.12``, ``--implementation cp``,
  ``--only-binary=:all:``. Only wheels can be installed for another platform,
  which every dependency has on PyPI. They are pinned to the versions
  installed here, so Lambda runs what the tests ran. The command line and
  ingest server (typer, rich, starlette, uvicorn) are left out: the handler
  never imports them.

``slim`` removes what a running pipeline never loads: PyArrow's tests, C++
headers and sources, Cython files, its Flight library, and the copies of
libraries that wheels hold instead of symlinks
(about 45 MB of the 170 MB PyArrow unzips to). The zip is reproducible: files
in sorted order with fixed timestamps, so the same inputs give the same bytes
and Terraform's ``source_code_hash`` changes only when something did.

Lambda's limits, reported after every build: 250 MB unzipped (function and
layers together: a hard limit), 50 MB zipped for a direct upload (larger
zips go through S3, as the Terraform module from ``sluiceway deploy
terraform`` does), 10 GB for a container image. The full zip with PyArrow is
about 150 MB unzipped.

``image`` writes a Dockerfile on ``public.ecr.aws/lambda/python:3.12`` with a
``requirements.txt`` of the same pins, the project and the pipeline folder,
for when the zip does not fit or an image is preferred. It is written, not
built: build and push it with Docker, then give Terraform ``image_uri``.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ..config import PipelineConfig
from ..errors import SluicewayError

MB = 1_000_000
MiB = 1 << 20
ZIP_NAME = "sluiceway-lambda.zip"
PIPELINE_DIR = "pipeline"
DIRECT_UPLOAD_LIMIT = 50 * MiB  # zipped, uploaded straight to Lambda
UNZIPPED_LIMIT = 262_144_000  # 250 MB unzipped, function and layers together
IMAGE_LIMIT = 10 * 1024**3  # 10 GB container image
PYTHON_VERSION = "3.12"
BASE_IMAGE = "public.ecr.aws/lambda/python"
ARCHITECTURES = {
    # Lambda's python3.12 runs on Amazon Linux 2023 (glibc 2.34): these wheel tags run there.
    "x86_64": ["manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux2014_x86_64"],
    "arm64": ["manylinux_2_34_aarch64", "manylinux_2_28_aarch64", "manylinux2014_aarch64"],
}
# Dependencies the handler never imports (the CLI and the HTTP ingest server).
NOT_ON_LAMBDA = {"typer", "rich", "starlette", "uvicorn"}
# What a running pipeline never loads (relative to the package root).
SLIM = [
    "pyarrow/tests",
    "pyarrow/include",
    "pyarrow/src",
    "pyarrow/*.pyx",
    "pyarrow/*.pxd",
    "pyarrow/*.pxi",
    "pyarrow/includes",
    "pyarrow/_pyarrow_cpp_tests*",
    "pyarrow/*flight*",  # nothing else links libarrow_flight (substrait, though, is linked)
    "*/__pycache__",
    "bin",
]
# Wheels cannot hold symlinks, so libfoo.so and libfoo.so.X.Y.Z are copies of
# libfoo.so.X, the name the other libraries load (their DT_NEEDED).
_UNVERSIONED = re.compile(r"^(lib[^/]+)\.so$")
_FULL_VERSION = re.compile(r"^(lib[^/]+)\.so\.(\d+)\.\d+\.\d+$")
_SONAME = re.compile(r"^lib[^/]+\.so\.\d+$")
# Never copied from the pipeline's folder.
SKIP_DIRS = {
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    "node_modules",
    "dist",
    "build",
    "infra",
    ".terraform",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    ".mypy_cache",
}
SKIP_FILES = ["*.pyc", "*.zip", "*.tfstate", "*.tfstate.*", ".DS_Store"]


class PackageError(SluicewayError):
    """Packaging failed: pip could not install a dependency for Lambda, or a limit is broken."""


@dataclass(frozen=True)
class Limit:
    """One of Lambda's size limits, and how the package compares."""

    name: str
    limit: int
    size: int
    hard: bool  # a hard limit breaks the deployment; the other one changes how to upload
    advice: str = ""

    @property
    def ok(self) -> bool:
        return self.size <= self.limit


@dataclass
class PackageReport:
    """What was built, how big it is, and whether Lambda takes it."""

    path: Path
    kind: str  # zip | image
    python_version: str
    architecture: str
    files: int
    size: int  # the zip's bytes, or the image context's
    unzipped: int
    requirements: list[str]
    trimmed: list[str] = field(default_factory=list)
    limits: list[Limit] = field(default_factory=list)
    largest: list[tuple[str, int]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(lim.ok for lim in self.limits if lim.hard)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "python_version": self.python_version,
            "architecture": self.architecture,
            "files": self.files,
            "size": self.size,
            "unzipped": self.unzipped,
            "requirements": self.requirements,
            "trimmed": self.trimmed,
            "limits": [
                {
                    "name": lim.name,
                    "limit": lim.limit,
                    "size": lim.size,
                    "ok": lim.ok,
                    "hard": lim.hard,
                    "advice": lim.advice,
                }
                for lim in self.limits
            ],
            "largest": [{"name": n, "bytes": b} for n, b in self.largest],
            "warnings": self.warnings,
            "ok": self.ok,
        }


# -- what goes in ---------------------------------------------------------------------


def _name(requirement: str) -> str:
    m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if m is None:
        raise PackageError(f"cannot read the requirement {requirement!r}")
    return m.group(1)


def _pinned(name: str, fallback: str) -> str:
    try:
        return f"{name}=={metadata.version(name)}"
    except metadata.PackageNotFoundError:
        return fallback


def runtime_requirements() -> list[str]:
    """Sluiceway's dependencies on Lambda (plus boto3), pinned to the versions installed here."""
    try:
        declared = metadata.requires("sluiceway") or []
    except metadata.PackageNotFoundError:  # running from a source tree without metadata
        declared = [
            "pyarrow",
            "pydantic",
            "ruamel.yaml",
            "json5",
            "watchfiles",
            "prometheus-client",
            "xxhash",
        ]
    out = []
    for req in declared:
        if "extra ==" in req:
            continue
        name = _name(req)
        if name.lower() in NOT_ON_LAMBDA:
            continue
        out.append(_pinned(name, req.split(";")[0].strip()))
    out.append(_pinned("boto3", "boto3"))
    return out


def _project_dir() -> Path:
    import sluiceway

    return Path(sluiceway.__file__).resolve().parent


def pipeline_files(
    pipeline_path: Path, cfg: PipelineConfig | None, skip: Iterable[Path] = ()
) -> list[Path]:
    """The files of the pipeline's folder that belong in the package (see the docstring)."""
    root = pipeline_path.resolve().parent
    skipped = {p.resolve() for p in skip}
    if cfg is not None:
        skipped.add(cfg.state_path.resolve())
        for name in cfg.buckets:
            url = cfg.buckets[name]
            if "://" not in url or url.startswith("file://"):
                skipped.add(cfg.resolve_path(url).resolve())
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in SKIP_DIRS and not d.startswith(".") and (here / d).resolve() not in skipped
        )
        for f in sorted(filenames):
            if f.startswith(".") and f != ".env.example":
                continue
            if any(fnmatch.fnmatch(f, pat) for pat in SKIP_FILES):
                continue
            out.append(here / f)
    return out


def _pip_install(
    target: Path,
    requirements: Sequence[str],
    *,
    python_version: str,
    architecture: str,
    pip_args: Sequence[str] = (),
) -> None:
    platforms = ARCHITECTURES[architecture]
    cmd = [sys.executable, "-m", "pip", "install", "--target", str(target)]
    for p in platforms:
        cmd += ["--platform", p]
    cmd += [
        "--implementation",
        "cp",
        "--python-version",
        python_version,
        "--only-binary=:all:",
        "--no-compile",
        "--disable-pip-version-check",
        "--quiet",
        *pip_args,
        *requirements,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout)[-3000:]
        raise PackageError(
            f"pip could not install the dependencies for Lambda (Python {python_version}, "
            f"{architecture}): {tail.strip()}\n(command: {' '.join(cmd)})"
        )


def _slim(root: Path) -> list[str]:
    removed = []
    for pattern in SLIM:
        for path in sorted(root.glob(pattern)):
            if not path.exists():
                continue
            removed.append(str(path.relative_to(root)))
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    libs = root / "pyarrow"
    for lib in sorted(libs.glob("lib*.so*")) if libs.is_dir() else []:
        copy_of = None
        if m := _FULL_VERSION.match(lib.name):
            copy_of = lib.parent / f"{m[1]}.so.{m[2]}"
        elif m := _UNVERSIONED.match(lib.name):
            sonames = [v for v in lib.parent.glob(f"{m[1]}.so.*") if _SONAME.match(v.name)]
            copy_of = sonames[0] if len(sonames) == 1 else None
        if copy_of is None or not copy_of.exists() or copy_of == lib:
            continue
        if copy_of.stat().st_size == lib.stat().st_size:  # a copy, not another library
            removed.append(str(lib.relative_to(root)))
            lib.unlink()
    return removed


def _tree_size(root: Path) -> tuple[int, int]:
    files = size = 0
    for path in root.rglob("*"):
        if path.is_file():
            files += 1
            size += path.stat().st_size
    return files, size


def _largest(root: Path, n: int = 8) -> list[tuple[str, int]]:
    sizes: dict[str, int] = {}
    for path in root.rglob("*"):
        if path.is_file():
            top = path.relative_to(root).parts[0]
            sizes[top] = sizes.get(top, 0) + path.stat().st_size
    return sorted(sizes.items(), key=lambda kv: -kv[1])[:n]


def _write_zip(root: Path, out: Path) -> None:
    """A reproducible zip: sorted names, fixed times, plain permissions."""
    tmp = out.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as z:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            name = path.relative_to(root).as_posix()
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            mode = 0o755 if os.access(path, os.X_OK) or ".so" in path.name else 0o644
            info.external_attr = (0o100000 | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with path.open("rb") as src, z.open(info, "w") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    tmp.replace(out)


def _stage_sources(
    root: Path, pipeline_path: Path, cfg: PipelineConfig | None, out_dir: Path
) -> int:
    """Copy the project and the pipeline's folder into ``root``; returns the pipeline's files."""
    shutil.copytree(
        _project_dir(),
        root / "sluiceway",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        dirs_exist_ok=True,
    )
    if cfg is None:  # its local bucket directories and state stay out
        from ..config import load

        cfg = load(pipeline_path)
    base = pipeline_path.resolve().parent
    files = pipeline_files(pipeline_path, cfg, skip=[out_dir])
    for f in files:
        dest = root / PIPELINE_DIR / f.relative_to(base)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest)
    return len(files)


def _limits(kind: str, size: int, unzipped: int) -> list[Limit]:
    if kind == "image":
        return [Limit("container image", IMAGE_LIMIT, unzipped, True, "an image is up to 10 GB")]
    return [
        Limit(
            "unzipped (function + layers)",
            UNZIPPED_LIMIT,
            unzipped,
            True,
            "too big for a zip: use `sluiceway package --image`",
        ),
        Limit(
            "zipped, direct upload",
            DIRECT_UPLOAD_LIMIT,
            size,
            False,
            "upload through S3 (the Terraform module from `sluiceway deploy terraform` does)",
        ),
    ]


def build_zip(
    pipeline_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    config: PipelineConfig | None = None,
    python_version: str = PYTHON_VERSION,
    architecture: str = "x86_64",
    dependencies: bool = True,
    requirements: Sequence[str] = (),
    slim: bool = True,
    pip_args: Sequence[str] = (),
) -> PackageReport:
    """Build ``out_dir/sluiceway-lambda.zip`` for the pipeline (see the module docstring).

    ``dependencies=False`` leaves Sluiceway's own dependencies out (a quick
    structural build, e.g. for tests, or for a Lambda layer that has them);
    ``requirements`` are installed either way (the pipeline's own needs).
    """
    if architecture not in ARCHITECTURES:
        raise PackageError(f"architecture {architecture!r}: use x86_64 or arm64")
    path = Path(pipeline_path).resolve()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    reqs = (runtime_requirements() if dependencies else []) + list(requirements)
    with tempfile.TemporaryDirectory(prefix="sluiceway-package-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        if reqs:
            _pip_install(
                root,
                reqs,
                python_version=python_version,
                architecture=architecture,
                pip_args=pip_args,
            )
        trimmed = _slim(root) if slim else []
        pipeline_count = _stage_sources(root, path, config, out)
        files, unzipped = _tree_size(root)
        largest = _largest(root)
        zip_path = out / ZIP_NAME
        _write_zip(root, zip_path)
    size = zip_path.stat().st_size
    report = PackageReport(
        path=zip_path,
        kind="zip",
        python_version=python_version,
        architecture=architecture,
        files=files,
        size=size,
        unzipped=unzipped,
        requirements=reqs,
        trimmed=trimmed,
        limits=_limits("zip", size, unzipped),
        largest=largest,
    )
    if not dependencies:
        report.warnings.append(
            "built without Sluiceway's dependencies: give them to the function as a layer"
        )
    if pipeline_count > 200:
        report.warnings.append(
            f"the pipeline's folder put {pipeline_count} files in the package; keep the "
            "pipeline in a folder of its own"
        )
    return report


DOCKERFILE = """\
# syntax=docker/dockerfile:1
# Written by `sluiceway package --image` for pipeline {pipeline!r}.
# Build for the function's architecture, push, and deploy it with Terraform:
#   docker build --platform linux/{docker_arch} \\
#       -t ACCOUNT.dkr.ecr.REGION.amazonaws.com/{repo}:TAG {context}
#   docker push ACCOUNT.dkr.ecr.REGION.amazonaws.com/{repo}:TAG
#   terraform apply -var image_uri=ACCOUNT.dkr.ecr.REGION.amazonaws.com/{repo}:TAG \\
#                   -var lambda_architecture={architecture}
FROM {base}:{python_version}

# Dependencies first (this layer is cached while only the pipeline changes).
COPY requirements.txt ${{LAMBDA_TASK_ROOT}}/requirements.txt
RUN pip install --no-cache-dir --only-binary=:all: \\
        -r ${{LAMBDA_TASK_ROOT}}/requirements.txt --target ${{LAMBDA_TASK_ROOT}} \\
    && rm -rf ${{LAMBDA_TASK_ROOT}}/pyarrow/tests ${{LAMBDA_TASK_ROOT}}/pyarrow/include

COPY sluiceway ${{LAMBDA_TASK_ROOT}}/sluiceway
COPY {pipeline_dir} ${{LAMBDA_TASK_ROOT}}/{pipeline_dir}

ENV SLUICEWAY_PIPELINE={pipeline_dir}/{pipeline_file}
CMD ["sluiceway.aws.handler.handler"]
"""


def write_image(
    pipeline_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    config: PipelineConfig | None = None,
    python_version: str = PYTHON_VERSION,
    architecture: str = "x86_64",
    requirements: Sequence[str] = (),
) -> PackageReport:
    """Write ``out_dir/image/``: a Dockerfile and its build context (not built here)."""
    if architecture not in ARCHITECTURES:
        raise PackageError(f"architecture {architecture!r}: use x86_64 or arm64")
    path = Path(pipeline_path).resolve()
    out = Path(out_dir).resolve()
    context = out / "image"
    if context.exists():
        shutil.rmtree(context)
    context.mkdir(parents=True)
    reqs = runtime_requirements() + list(requirements)
    (context / "requirements.txt").write_text("\n".join(reqs) + "\n", encoding="utf-8")
    _stage_sources(context, path, config, out)
    name = config.pipeline if config is not None else path.parent.name
    (context / "Dockerfile").write_text(
        DOCKERFILE.format(
            pipeline=name,
            repo=re.sub(r"[^a-z0-9._-]", "-", name.lower()),
            context=os.path.relpath(context),
            base=BASE_IMAGE,
            python_version=python_version,
            docker_arch="amd64" if architecture == "x86_64" else "arm64",
            architecture=architecture,
            pipeline_dir=PIPELINE_DIR,
            pipeline_file=path.name,
        ),
        encoding="utf-8",
    )
    files, size = _tree_size(context)
    return PackageReport(
        path=context / "Dockerfile",
        kind="image",
        python_version=python_version,
        architecture=architecture,
        files=files,
        size=size,
        unzipped=size,
        requirements=reqs,
        limits=_limits("image", size, size),
        largest=_largest(context),
        warnings=[
            "the image is written, not built: its size is known after `docker build` "
            "(with PyArrow, about 700 MB including the base image; Lambda takes 10 GB)"
        ],
    )
