"""Generate Python code, grpc stubs and typing stubs for every proto under protos/.

Usage: python protos/generate.py [OUTPUT_DIR]   (default: libs/common/src)
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import grpc_tools
from google.api import field_behavior_pb2
from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT.parent / "libs" / "common" / "src"
DESCRIPTORS = "descriptors.binpb"


def generate(out_dir: Path) -> None:
    package_dir = out_dir / "herald"
    if package_dir.exists():
        shutil.rmtree(package_dir)
    package_dir.mkdir(parents=True)
    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "herald").rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    # google/api annotations (field_behavior, resource) ship with googleapis-common-protos.
    googleapis = Path(field_behavior_pb2.__file__).parent.parent.parent
    # protoc looks plugins up on PATH; make the ones installed beside this interpreter visible.
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"-I{googleapis}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        # Served by reflection, so that `grpcurl describe` shows the protos' comments.
        f"--descriptor_set_out={package_dir / DESCRIPTORS}",
        "--include_source_info",
        "--include_imports",
        *sources,
    ]
    cwd = os.getcwd()
    os.chdir(PROTO_ROOT)
    try:
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
    finally:
        os.chdir(cwd)
    for directory in [package_dir, *(p for p in package_dir.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    (package_dir / "py.typed").touch()


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
