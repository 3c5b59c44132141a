"""scripts/bench/bench_batch.py runs end to end on a tiny workload and writes its JSON (no timing asserted)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))

import bench_batch  # noqa: E402


def test_bench_batch_writes_every_mode_with_interleaved_rounds(tmp_path, capsys):
    out = tmp_path / "batch.json"
    assert bench_batch.main(["--requests", "4", "--max-tokens", "3", "--max-batch", "4", "--rounds", "2",
                             "--min-prompt", "8", "--max-prompt", "20", "--json-out", str(out)]) == 0
    result = json.loads(out.read_text())
    modes = [row["mode"] for row in result["rows"]]
    assert modes == ["one at a time (max_batch 1)", "batch runner (max_batch 4)"]
    for row in result["rows"]:
        assert len(row["wall_s_all"]) == 2 and row["wall_s"] > 0
        assert row["tokens_per_s"] == 4 * 3 / row["wall_s"]
    assert result["rows"][0]["ratio"] == 1.0 and result["outputs_equal"]
    assert "| batch runner (max_batch 4) |" in capsys.readouterr().out
