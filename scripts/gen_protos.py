"""Generate the Python gRPC code for protos/recsys/v1/*.proto, next to the .proto files.

Per proto: `_pb2.py` (messages), `_pb2_grpc.py` (stubs and servicers) and their mypy-protobuf
stubs `_pb2.pyi` and `_pb2_grpc.pyi` (typed messages; sync and asyncio stub types), which type-check
rpc/clients.py (tests/unit/test_typed_clients.py). Run with `make protos`. The output is committed;
tests/unit/test_protos_fresh.py regenerates into a temporary folder and fails when the committed
files are stale.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from grpc_tools import protoc
import grpc_tools

PROTO_ROOT = Path(__file__).resolve().parent.parent / "protos"


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    return sorted((root / "recsys" / "v1").glob("*.proto"))


def plugin(name: str) -> Path:
    """A protoc plugin installed with this Python (mypy-protobuf's are in the venv's bin/)."""
    beside = Path(sys.executable).with_name(name)  # not resolved: the venv's bin/, not the base Python's
    found = beside if beside.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found next to {sys.executable} nor on PATH: install mypy-protobuf "
                         "(the dev extra, `make setup`)")
    return Path(found)


def generate(out_dir: Path, root: Path = PROTO_ROOT) -> None:
    """Compile every recsys/v1 proto into out_dir (messages, gRPC stubs and their mypy-protobuf .pyi)."""
    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--mypy_out=quiet:{out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_grpc_out=quiet:{out_dir}",
        *[str(p.relative_to(root)) for p in proto_files(root)],
    ]
    # protoc resolves the relative .proto paths against the -I roots; run it from the root.
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")


if __name__ == "__main__":
    generate(PROTO_ROOT)
    print(f"generated gRPC code for {len(proto_files())} protos in {PROTO_ROOT / 'recsys' / 'v1'}", file=sys.stderr)
