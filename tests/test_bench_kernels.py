"""scripts/bench_kernels.py on the CPU, tiny shapes: every implementation runs and agrees with the
reference, the work counted matches the formulas, a failing peer is reported. No timing asserts."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))

import bench_kernels  # noqa: E402

TINY = ["--platform", "cpu", "--decode-batch", "3", "--contexts", "40", "100", "--prefill-seq", "48",
        "--skewed-contexts", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--page-size", "8", "--reps", "2",
        "--copy-mib", "8", "--matmul-n", "128"]


def test_cpu_run_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert bench_kernels.main(TINY + ["--json-out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    decode = [r for r in rows if r["kernel"] == "decode"]
    prefill = [r for r in rows if r["kernel"] == "prefill"]
    assert {r["impl"] for r in decode} == {"splitserve xla", "reference (XLA)"}
    assert len(decode) == 6 and len(prefill) == 2
    prefix = [r for r in rows if r["kernel"] == "prefill+prefix"]  # the last 48 / 8 tokens after 42
    assert {r["impl"] for r in prefix} == {"reference (XLA)", "query chunks (XLA)"}
    assert {r["shape"] for r in prefix} == {"b=1 new=6 after 42 h=4/2 d=16"}
    for r in rows:
        assert r["error"] is None, r
        assert r["ms"] > 0 and r["achieved"] > 0 and r["of_ceiling"] > 0
        assert r["rel_err"] < 1e-5, r  # float32 against the float32 reference
    for shape in {r["shape"] for r in rows}:
        a, b = (r for r in rows if r["shape"] == shape)
        assert a["vs_best_peer"] * b["vs_best_peer"] == pytest.approx(1.0)  # two peers: reciprocal ratios
    assert result["ceilings"]["copy_tbytes_per_s"] > 0 and result["ceilings"]["matmul_tflops"] > 0
    table = capsys.readouterr().out
    assert "| decode | b=3 ctx=100 h=4/2 d=16 page=8 | splitserve xla |" in table
    assert "| decode | b=3 ctx=1/16 at 64, rest 8 h=4/2 d=16 page=8 | splitserve xla |" in table


def test_work_formulas():
    cfg = bench_kernels.parse_args(TINY)[0]
    # 3 rows x 100 tokens x 2 KV heads x 16 x (K and V) x 4 bytes, plus q and output: 2 x 3 x 4 x 16 x 4.
    assert bench_kernels.decode_bytes(cfg, 100) == 3 * 100 * 2 * 16 * 2 * 4 + 2 * 3 * 4 * 16 * 4
    # Causal: QK^T and PV over half of the 48 x 48 scores, 2 FLOPs per multiply-add: 2 x 1 x 4 x 48^2 x 16.
    assert bench_kernels.prefill_flops(cfg) == 2 * 1 * 4 * 48**2 * 16
    # After a prefix: the whole triangle less the prefix's own, 48^2 - 42^2.
    assert bench_kernels.prefix_flops(cfg) == 2 * 1 * 4 * (48**2 - 42**2) * 16
    # Skewed: row 0 of 3 holds 64 tokens, rows 1 and 2 hold 64 / 8.
    assert list(bench_kernels.decode_lengths(cfg, 64, skewed=True)) == [64, 8, 8]
    assert bench_kernels.decode_bytes(cfg, 64, skewed=True) == (64 + 8 + 8) * 2 * 16 * 2 * 4 + 2 * 3 * 4 * 16 * 4


def test_failing_peer_is_reported_not_fatal():
    cfg = bench_kernels.parse_args(TINY)[0]
    inputs = bench_kernels.decode_inputs(cfg, 40, seed=0)

    def broken(*args):
        raise RuntimeError("not supported on this device")

    good = bench_kernels.decode_impls("cpu")["reference (XLA)"]
    ref = good(*inputs)
    rows = bench_kernels.run_shape("decode", "s", {"broken": broken, "good": good}, inputs, ref,
                                   bench_kernels.decode_bytes(cfg, 40), 1.0, reps=1)
    assert rows[0].error == "RuntimeError: not supported on this device" and rows[0].ms is None
    assert rows[1].error is None and rows[1].rel_err == 0.0 and rows[1].vs_best_peer is None


def test_bad_config_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        bench_kernels.parse_args(TINY + ["--kv-heads", "3"])
    assert e.value.code == 2
    assert "heads (4) must be a multiple of kv_heads (3)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_kernels.parse_args(TINY + ["--prefix-new-tokens", "48"])  # no prefix left
    assert "--prefix-new-tokens must be in [0, prefill seq 48), got 48" in capsys.readouterr().err


def test_our_variants_are_compared_with_the_peers_only():
    """--tune rows ("splitserve gpu <settings>") are ours: none of our rows counts as another's peer."""
    cfg = bench_kernels.parse_args(TINY)[0]
    inputs = bench_kernels.decode_inputs(cfg, 40, seed=0)
    good = bench_kernels.decode_impls("cpu")["reference (XLA)"]
    impls = {"splitserve xla": good, f"{bench_kernels.VARIANT_PREFIX}ppcb=2": good, "peer": good}
    rows = bench_kernels.run_shape("decode", "s", impls, inputs, good(*inputs),
                                   bench_kernels.decode_bytes(cfg, 40), 1.0, reps=1)
    ours, variant, peer = rows
    assert ours.vs_best_peer == pytest.approx(peer.ms / ours.ms)
    assert variant.vs_best_peer == pytest.approx(peer.ms / variant.ms)
    assert peer.vs_best_peer == pytest.approx(min(ours.ms, variant.ms) / peer.ms)


def test_a_peer_with_wrong_output_is_shown_but_not_compared_with():
    cfg = bench_kernels.parse_args(TINY)[0]
    inputs = bench_kernels.decode_inputs(cfg, 40, seed=0)
    good = bench_kernels.decode_impls("cpu")["reference (XLA)"]
    rows = bench_kernels.run_shape("decode", "s", {"splitserve xla": good, "wrong": lambda *a: 2 * good(*a),
                                                   "peer": good}, inputs, good(*inputs),
                                   bench_kernels.decode_bytes(cfg, 40), 1.0, reps=1)
    ours, wrong, peer = rows
    assert wrong.rel_err == pytest.approx(1.0) and wrong.ms > 0
    assert ours.vs_best_peer == pytest.approx(peer.ms / ours.ms)  # not min(wrong, peer)
