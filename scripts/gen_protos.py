"""Regenerates the Python code for protos/*.proto (messages, gRPC stubs, type stubs).

    python scripts/gen_protos.py            # rewrite protos/*_pb2*.py(i)
    python scripts/gen_protos.py --check    # exit 1, naming the stale files, if they differ

protoc names imports after the path it was given, so the .proto files are copied into a temp
tree laid out as <tmp>/splitserve/protos/*.proto and compiled with -I<tmp>: the generated code
then imports `splitserve.protos.internal_pb2`, which works inside the installed package
(a bare `import internal_pb2` does not).

The output depends on the grpcio-tools version (it is stamped into the files), so --check
compares against what the installed grpcio-tools would write.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.resources
import pathlib
import shutil
import sys
import tempfile

PROTO_DIR = pathlib.Path(__file__).resolve().parent.parent / "protos"
PACKAGE_PATH = pathlib.Path("splitserve") / "protos"  # import path of the generated modules
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def expected_outputs(proto_dir: pathlib.Path) -> list[str]:
    """File names protoc writes for the .proto files in `proto_dir`."""
    return sorted(p.stem + s for p in proto_dir.glob("*.proto") for s in SUFFIXES)


def generate(proto_dir: pathlib.Path, out_dir: pathlib.Path) -> list[str]:
    """Compiles every proto_dir/*.proto; writes the generated files into out_dir. Returns their names."""
    from grpc_tools import protoc  # imported here: only generation needs grpcio-tools

    protos = sorted(proto_dir.glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files in {proto_dir}")
    with tempfile.TemporaryDirectory(prefix="gen_protos_") as tmp:
        root = pathlib.Path(tmp)
        src = root / "src"
        gen = root / "gen"
        (src / PACKAGE_PATH).mkdir(parents=True)
        gen.mkdir()
        for p in protos:
            shutil.copyfile(p, src / PACKAGE_PATH / p.name)
        well_known = importlib.resources.files("grpc_tools") / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{src}",
            f"-I{well_known}",
            f"--python_out={gen}",
            f"--grpc_python_out={gen}",
            f"--pyi_out={gen}",
            *(str(src / PACKAGE_PATH / p.name) for p in protos),
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise SystemExit(f"protoc failed (exit {rc}) on {', '.join(p.name for p in protos)}")
        names = expected_outputs(proto_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            produced = gen / PACKAGE_PATH / name
            if not produced.is_file():
                raise SystemExit(f"protoc did not write {PACKAGE_PATH / name}")
            shutil.copyfile(produced, out_dir / name)
    return names


def stale_files(proto_dir: pathlib.Path, out_dir: pathlib.Path) -> dict[str, str]:
    """Generated files in out_dir that differ from a fresh generation: name -> short reason."""
    with tempfile.TemporaryDirectory(prefix="gen_protos_check_") as tmp:
        fresh_dir = pathlib.Path(tmp)
        names = generate(proto_dir, fresh_dir)
        stale: dict[str, str] = {}
        for name in names:
            committed = out_dir / name
            fresh = (fresh_dir / name).read_text()
            if not committed.is_file():
                stale[name] = "missing"
            elif committed.read_text() != fresh:
                diff = difflib.unified_diff(committed.read_text().splitlines(), fresh.splitlines(),
                                            "committed", "fresh", n=0, lineterm="")
                changed = [line for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---")]
                stale[name] = f"differs ({len(changed)} changed lines)"
    for suffix in SUFFIXES:  # generated files whose .proto is gone
        for path in out_dir.glob("*" + suffix):
            if path.name not in names:
                stale[path.name] = f"left over: no {path.name[: -len(suffix)]}.proto"
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the committed generated files are stale")
    parser.add_argument("--proto-dir", type=pathlib.Path, default=PROTO_DIR,
                        help="folder with the .proto files and their generated code (default: protos/)")
    args = parser.parse_args(argv)
    proto_dir = args.proto_dir.resolve()
    if args.check:
        stale = stale_files(proto_dir, proto_dir)
        if stale:
            lines = "\n".join(f"  {proto_dir / n}: {why}" for n, why in sorted(stale.items()))
            print(f"generated protobuf code is stale:\n{lines}\n"
                  f"regenerate with: python scripts/gen_protos.py", file=sys.stderr)
            return 1
        print(f"generated protobuf code in {proto_dir} is up to date")
        return 0
    for name in generate(proto_dir, proto_dir):
        print(f"wrote {proto_dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
