"""Build of the berth Python client: the berth.v1 stubs are generated from the repository's
.proto files by grpcio-tools while the package is built, never written by hand or committed.

``pip install ./client/python`` (pip >= 21.3 builds a local directory in place, so
``../../proto`` is at hand); ``pip install --no-build-isolation ./client/python`` in an
environment that already has grpcio-tools. ``BERTH_PROTO_DIR`` names another proto root.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def proto_root() -> str:
    """The directory that holds ``berth/v1/*.proto``."""
    root = os.environ.get("BERTH_PROTO_DIR") or os.path.join(HERE, "..", "..", "proto")
    root = os.path.normpath(root)
    if not glob.glob(os.path.join(root, "berth", "v1", "*.proto")):
        sys.exit(
            f"berth: no berth/v1/*.proto under {root}: the Python client is built from the "
            "berth repository (pip install ./client/python, from its root), or set "
            "BERTH_PROTO_DIR to the directory that holds berth/v1/*.proto"
        )
    return root


def generate_stubs(out_dir: str) -> None:
    """``<out_dir>/berth/v1/*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py``: the protos import
    each other as ``berth/v1/host.proto``, so the generated modules import ``berth.v1.host_pb2``,
    which is this package."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        sys.exit(
            "berth: building the Python client needs grpcio-tools (pip install grpcio-tools, "
            "or let pip build in an isolated environment, which installs it)"
        )
    root = proto_root()
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    protos = sorted(
        os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "berth", "v1", "*.proto"))
    )
    os.makedirs(os.path.join(out_dir, "berth", "v1"), exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        sys.exit(f"berth: grpc_tools.protoc failed on {', '.join(protos)} (under {root})")


class BuildPyWithStubs(build_py):
    """build_py, then the stubs next to the copied sources (in ``src/`` for an editable install)."""

    def run(self) -> None:
        if not getattr(self, "editable_mode", False):
            # An in-place build keeps build/ between builds: start from nothing, so that a module
            # since removed or renamed is not installed again.
            shutil.rmtree(os.path.join(self.build_lib, "berth"), ignore_errors=True)
        super().run()
        if getattr(self, "editable_mode", False):
            generate_stubs(os.path.join(HERE, "src"))
        else:
            generate_stubs(self.build_lib)


def requirements() -> list[str]:
    """grpcio and protobuf no older than the grpcio-tools that generates the stubs: generated code
    refuses to load under an older runtime."""
    reqs = {"grpcio": "1.59", "protobuf": "4.21"}
    try:
        from importlib.metadata import version

        reqs["grpcio"] = version("grpcio-tools")
        reqs["protobuf"] = ".".join(version("protobuf").split(".")[:2])
    except Exception:  # grpcio-tools absent: metadata only (an sdist); the build itself needs it
        pass
    return [f"{name}>={v}" for name, v in reqs.items()]


setup(cmdclass={"build_py": BuildPyWithStubs}, install_requires=requirements())
