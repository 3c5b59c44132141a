"""scripts/bench/bench_roofline.py's measurement on the demo model, one tiny shape: figures are
positive and the byte count matches the formula worked out by hand. No timing asserts."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts" / "bench"))

import bench_roofline  # noqa: E402

from splitserve.models.loader import load_model  # noqa: E402
from splitserve.models.sharding import MeshConfig, make_mesh  # noqa: E402


def test_decode_figure_on_demo_model():
    runner = bench_roofline.make_runner(load_model("demo", make_mesh(MeshConfig(tp=1))), max_batch=2,
                                        max_context=48, page_size=16)
    fig = bench_roofline.measure_decode(runner, "demo", batch=2, context=48, steps=2, warmup_steps=1)

    assert fig.step_s > 0 and fig.step_s_min > 0 and fig.gbytes_per_s > 0
    # Demo model (models/demo.py), float32: 4 layers, 4 KV heads of 32; 2 rows x 48 tokens x (K, V).
    assert fig.bytes.kv == 2 * 48 * 2 * 4 * 4 * 32 * 4
    # Weights read: per layer q, o 256x256; k, v 256x128; gate, up, down 256x688; 2 norms of 256;
    # then the final norm and lm_head 256x2048. The untied input embedding is not read in full.
    per_layer = 2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 688 + 2 * 256
    assert fig.bytes.weights == (4 * per_layer + 256 + 256 * 2048) * 4
    assert fig.bytes.total == fig.bytes.weights + fig.bytes.kv


def test_a_failing_attention_is_reported_and_the_others_still_measured(tmp_path, capsys):
    cfg = bench_roofline.RooflineConfig(models=("demo",), batches=(2,), contexts=(32,), steps=1, warmup_steps=0,
                                        copy_mib=8, copy_reps=1, attention_impls=("xla", "bogus"))
    bandwidth, figures, failed = bench_roofline.run(cfg, tmp_path)
    assert [f.attention_impl for f in figures] == ["xla"] and figures[0].device_step_s > 0
    assert failed == ["demo (bogus attention)"]
    assert "impl must be one of" in capsys.readouterr().err  # the traceback says why
