"""The committed generated protobuf code is current, importable as a package, and keeps presence."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gen_protos.py"


def _check(proto_dir: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--check", "--proto-dir", str(proto_dir)],
                          capture_output=True, text=True, timeout=120)


def test_generated_code_is_current():
    result = _check(ROOT / "protos")
    assert result.returncode == 0, result.stderr


def test_check_fails_on_a_changed_proto(tmp_path):
    proto_dir = tmp_path / "protos"
    proto_dir.mkdir()
    for path in (ROOT / "protos").iterdir():
        if path.suffix in (".proto", ".py", ".pyi"):
            shutil.copyfile(path, proto_dir / path.name)
    assert _check(proto_dir).returncode == 0  # an unchanged copy passes

    internal = proto_dir / "internal.proto"
    text = internal.read_text()
    assert "message ReleaseResponse {\n  bool released = 1;\n}" in text
    internal.write_text(text.replace("bool released = 1;", "bool released = 1;\n  string note = 2;"))
    result = _check(proto_dir)
    assert result.returncode == 1
    assert "stale" in result.stderr
    for name in ("internal_pb2.py", "internal_pb2.pyi"):
        assert name in result.stderr
    assert "serving_pb2.py" not in result.stderr  # only what changed is named


def test_check_names_a_missing_file(tmp_path):
    proto_dir = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", proto_dir, ignore=shutil.ignore_patterns("__pycache__"))
    (proto_dir / "serving_pb2_grpc.py").unlink()
    result = _check(proto_dir)
    assert result.returncode == 1
    assert "serving_pb2_grpc.py: missing" in result.stderr


def test_generated_modules_import_as_a_package():
    from splitserve.protos import internal_pb2, internal_pb2_grpc, serving_pb2, serving_pb2_grpc

    assert internal_pb2.DESCRIPTOR.package == "splitserve.internal.v1"
    assert serving_pb2.DESCRIPTOR.package == "splitserve.v1"
    assert hasattr(internal_pb2_grpc, "DecodeStub") and hasattr(internal_pb2_grpc, "PrefillServicer")
    assert hasattr(serving_pb2_grpc, "ServingStub")
    for path in (ROOT / "protos").glob("*_pb2*.py"):
        text = path.read_text()
        assert "\nimport internal_pb2" not in text and "\nimport serving_pb2" not in text, path


@pytest.mark.parametrize("value", [0.0, 0.7])
def test_optional_presence(value):
    from splitserve.protos import serving_pb2

    assert serving_pb2.SamplingParams(temperature=value).HasField("temperature")
    assert not serving_pb2.SamplingParams().HasField("temperature")
    assert serving_pb2.SamplingParams(top_k=0).HasField("top_k")
    parsed = serving_pb2.SamplingParams.FromString(serving_pb2.SamplingParams(temperature=value).SerializeToString())
    assert parsed.HasField("temperature") and parsed.temperature == pytest.approx(value)
