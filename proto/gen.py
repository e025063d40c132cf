"""Regenerate the committed gRPC/protobuf code of the `meshtls` package.

    python proto/gen.py           # rewrite every target's generated *_pb2*.py[i]
    python proto/gen.py --check   # exit 1 if any committed generated file differs from proto/

Targets:

* `meshtls.v1`: our own API. The .proto tree mirrors the Python package
  (proto/meshtls/v1/x.proto declares `package meshtls.v1`), so protoc's absolute imports read
  `from meshtls.v1 import x_pb2` and need no post-processing.
* `meshtls.spiffe`: the vendored SPIFFE Workload API (proto/spiffe/workloadapi.proto, see its
  header). Messages only: the sidecar serves it with grpclib, so no grpcio stubs. It imports
  nothing but well-known types, so it is compiled from its own directory and lands in
  proto/meshtls/spiffe/ as `workloadapi_pb2.py[i]`.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Target:
    name: str
    include: Path  # the -I root the sources are named relative to
    sources: tuple[Path, ...]
    out_subdir: str  # where protoc writes them, relative to its output directory
    package_dir: Path  # where the committed generated files live
    grpc: bool  # also generate grpcio stubs

    @property
    def suffixes(self) -> tuple[str, ...]:
        base = ("_pb2.py", "_pb2.pyi")
        return (*base, "_pb2_grpc.py", "_pb2_grpc.pyi") if self.grpc else base

    def is_generated(self, path: Path) -> bool:
        return path.name.endswith(self.suffixes)


def targets(root: Path = PROTO_ROOT) -> tuple[Target, ...]:
    v1 = root / "meshtls" / "v1"
    spiffe = root / "spiffe"
    return (
        Target("meshtls.v1", root, tuple(sorted(v1.glob("*.proto"))), "meshtls/v1", v1, True),
        Target(
            "meshtls.spiffe",
            spiffe,
            (spiffe / "workloadapi.proto",),
            ".",
            root / "meshtls" / "spiffe",
            False,
        ),
    )


def generate(target: Target, out_dir: Path) -> list[Path]:
    """Run protoc with the (gRPC and) mypy-protobuf plugins into out_dir."""
    bin_dir = Path(sys.executable).parent
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{target.include}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--python_out={out_dir}",
        f"--mypy_out={out_dir}",
    ]
    if target.grpc:
        cmd += [
            f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
            f"--grpc_python_out={out_dir}",
            f"--mypy_grpc_out={out_dir}",
        ]
    cmd += [str(s) for s in target.sources]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"protoc failed for {target.name} with exit code {done.returncode}")
    produced = out_dir / target.out_subdir
    return sorted(p for p in produced.iterdir() if p.is_file() and target.is_generated(p))


def committed_files(target: Target) -> list[Path]:
    if not target.package_dir.is_dir():
        return []
    return sorted(p for p in target.package_dir.iterdir() if target.is_generated(p))


def stale_files(target: Target, fresh: list[Path]) -> list[str]:
    """Names that are missing, extra or different in the committed copy."""
    names = {p.name for p in fresh} ^ {p.name for p in committed_files(target)}
    names |= {
        p.name
        for p in fresh
        if not (target.package_dir / p.name).exists()
        or not filecmp.cmp(p, target.package_dir / p.name, shallow=False)
    }
    return sorted(names)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    stale: list[str] = []
    for target in targets():
        with tempfile.TemporaryDirectory() as tmp:
            fresh = generate(target, Path(tmp))
            if args.check:
                rel = target.package_dir.relative_to(PROTO_ROOT)
                stale += [f"{rel}/{name}" for name in stale_files(target, fresh)]
                continue
            for old in committed_files(target):
                old.unlink()
            target.package_dir.mkdir(parents=True, exist_ok=True)
            for path in fresh:
                shutil.copyfile(path, target.package_dir / path.name)
                print(f"wrote {(target.package_dir / path.name).relative_to(PROTO_ROOT)}")
    if args.check:
        if stale:
            print(
                "generated code is stale; run `python proto/gen.py`:",
                ", ".join(stale),
                file=sys.stderr,
            )
            return 1
        print("generated code is up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
