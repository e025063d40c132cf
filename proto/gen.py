"""Regenerate the committed gRPC/protobuf code of the `meshtls` package.

    python proto/gen.py           # rewrite proto/meshtls/v1/*_pb2*.py[i]
    python proto/gen.py --check   # exit 1 if the committed code differs from proto/

The .proto tree mirrors the Python package (proto/meshtls/v1/x.proto declares
`package meshtls.v1`), so protoc's absolute imports read `from meshtls.v1 import x_pb2`
and need no post-processing.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = PROTO_ROOT / "meshtls" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc with the gRPC and mypy-protobuf plugins into out_dir."""
    sources = sorted(PACKAGE_DIR.glob("*.proto"))
    bin_dir = Path(sys.executable).parent
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *[str(s) for s in sources],
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"protoc failed with exit code {done.returncode}")
    return sorted(
        p for p in (out_dir / "meshtls" / "v1").iterdir() if p.name.endswith(GENERATED_SUFFIXES)
    )


def committed_files() -> list[Path]:
    return sorted(p for p in PACKAGE_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        if args.check:
            stale = sorted(
                {p.name for p in fresh} ^ {p.name for p in committed_files()}
                | {
                    p.name
                    for p in fresh
                    if not (PACKAGE_DIR / p.name).exists()
                    or not filecmp.cmp(p, PACKAGE_DIR / p.name, shallow=False)
                }
            )
            if stale:
                print(
                    "generated code is stale; run `python proto/gen.py`:",
                    ", ".join(stale),
                    file=sys.stderr,
                )
                return 1
            print("generated code is up to date")
            return 0
        for old in committed_files():
            old.unlink()
        for path in fresh:
            shutil.copyfile(path, PACKAGE_DIR / path.name)
            print(f"wrote {path.relative_to(Path(tmp))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
