"""scripts/bench/bench_sampling.py on one tiny shape: every mode is timed, greedy is the 1.00x
baseline of its own run, and the JSON holds what the table shows. No timing asserts."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts" / "bench"))

import bench_sampling  # noqa: E402


def test_every_mode_is_timed_against_greedy_of_the_same_run(tmp_path, capsys):
    out = tmp_path / "sampling.json"
    assert bench_sampling.main(["--batches", "2", "--vocabs", "64", "--reps", "2", "--json-out", str(out)]) == 0
    figures = json.loads(out.read_text())["figures"]
    assert [(f["batch"], f["mode"]) for f in figures] == [(2, m) for m in bench_sampling.MODES]
    assert all(f["step_ms"] >= f["step_ms_min"] > 0 for f in figures)
    greedy = {f["batch"]: f["step_ms"] for f in figures if f["mode"] == "greedy"}
    assert all(abs(f["vs_greedy"] - f["step_ms"] / greedy[f["batch"]]) < 1e-9 for f in figures)
    printed = capsys.readouterr().out
    assert all(f"| 64 | {f['batch']} | {f['mode']} | {f['step_ms']:.3f} |" in printed for f in figures)
