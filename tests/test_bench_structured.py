"""scripts/bench/bench_structured_outputs.py at a tiny size: every mode runs in the same engine,
free text is the 1.00x baseline of its own run, the constrained rows' mask time is counted, and
the JSON holds what the table shows. No timing asserts."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts" / "bench"))

import bench_structured_outputs  # noqa: E402


def test_every_mode_is_measured_against_free_text_of_the_same_run(tmp_path, capsys):
    out = tmp_path / "structured.json"
    assert bench_structured_outputs.main(["--batch", "2", "--max-tokens", "6", "--rounds", "1",
                                          "--json-out", str(out)]) == 0
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == list(bench_structured_outputs.MODES)
    assert rows["free"]["vs_free"] == 1.0 and rows["free"]["mask_us_per_row_step"] == 0.0
    for mode in ("regex", "choice", "json"):
        r = rows[mode]
        assert r["mask_us_per_row_step"] > 0 and 0 < r["output_tokens"] <= 2 * 6
        assert abs(r["vs_free"] - r["tokens_per_s"] / rows["free"]["tokens_per_s"]) < 0.02 * r["vs_free"]
    printed = capsys.readouterr().out
    assert all(line.split()[0] in rows for line in printed.splitlines()[2:])
