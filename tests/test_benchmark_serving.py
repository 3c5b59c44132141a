"""Serving benchmark: metric maths on hand-built records, workloads, arrivals, reports, and one
end-to-end run of `splitserve bench` against a real launched stack."""

import json
import math
import os

import numpy as np
import pytest

from splitserve.runtime import cli_bench
from splitserve.runtime.cli import build_parser
from splitserve.runtime.serving_bench.arrivals import arrival_offsets, parse_rates
from splitserve.runtime.cli_serve import launch_config
from splitserve.runtime.serving_bench.compare import CompareSpec, launch_flags
from splitserve.runtime.serving_bench.interference import interference
from splitserve.runtime.serving_bench.metrics import RequestRecord, meets_slos, parse_goodput, summarize
from splitserve.runtime.serving_bench.report import comparison_table, result_block
from splitserve.runtime.serving_bench.workloads import (
    MixedSpec, WorkloadSpec, build_workload, mixed_requests, random_requests, sharegpt_requests, spread_lengths,
)
from splitserve.models.sharding import MeshConfig
from stack import launched


def record(index, start, chunks, end, tokens=None, kind="random", prompt_len=10, error=""):
    return RequestRecord(index, kind, prompt_len, 8, start, start, list(chunks), list(tokens or [1] * len(chunks)),
                         end, error)


# A: 3 tokens, TTFT 100 ms, E2EL 700 ms, TPOT (700-100)/2 = 300 ms, ITL 200, 300 ms.
# B: 1 token, TTFT 500 ms, E2EL 600 ms, no TPOT, no ITL.
# C: 4 tokens in 3 chunks (the second carries 2), TTFT 200, E2EL 500, TPOT (500-200)/3 = 100, ITL 100, 200.
# D: failed.
A = record(0, 0.0, [0.1, 0.3, 0.6], 0.7)
B = record(1, 1.0, [1.5], 1.6)
C = record(2, 2.0, [2.2, 2.3, 2.5], 2.5, tokens=[1, 2, 1])
D = record(3, 3.0, [], 3.1, error="UNAVAILABLE: worker failed")


def test_per_request_ttft_tpot_itl_e2el():
    assert A.ttft_s == pytest.approx(0.1) and A.e2el_s == pytest.approx(0.7)
    assert A.tpot_s == pytest.approx(0.3) and A.itl_s == pytest.approx([0.2, 0.3])
    assert B.tpot_s is None and B.itl_s == [] and B.output_tokens == 1
    assert C.output_tokens == 4 and C.tpot_s == pytest.approx(0.1) and C.itl_s == pytest.approx([0.1, 0.2])
    assert not D.success and D.ttft_s is None
    assert RequestRecord.from_json(C.to_json()) == C


def test_summary_means_percentiles_and_throughput():
    m = summarize([A, B, C, D], duration_s=5.0)
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (3, 1, 30, 8)
    assert m["request_throughput"] == pytest.approx(0.6) and m["output_throughput"] == pytest.approx(1.6)
    assert m["total_token_throughput"] == pytest.approx(38 / 5)
    assert m["mean_ttft_ms"] == pytest.approx(800 / 3) and m["median_ttft_ms"] == pytest.approx(200)
    # TPOT over A and C only: [300, 100]; p99 = 100 + 0.99 * 200 (linear interpolation)
    assert m["mean_tpot_ms"] == pytest.approx(200) and m["p99_tpot_ms"] == pytest.approx(298)
    # ITL pooled: [200, 300, 100, 200] -> sorted [100, 200, 200, 300]
    assert m["mean_itl_ms"] == pytest.approx(200) and m["p50_itl_ms"] == pytest.approx(200)
    assert m["p90_itl_ms"] == pytest.approx(270) and m["p99_itl_ms"] == pytest.approx(297)
    # E2EL [700, 600, 500]
    assert m["mean_e2el_ms"] == pytest.approx(600) and m["p90_e2el_ms"] == pytest.approx(680)
    assert m["request_goodput"] is None


def test_no_successful_request_gives_no_statistics():
    m = summarize([D], duration_s=1.0)
    assert m["completed"] == 0 and m["mean_ttft_ms"] is None and m["p99_itl_ms"] is None


@pytest.mark.parametrize("slos, good", [
    ({"ttft": 250}, 2),  # A (100) and C (200); B's 500 misses
    ({"ttft": 250, "tpot": 150}, 1),  # A's TPOT 300 misses; B has no TPOT (counts as 0) but misses TTFT
    ({"e2el": 650}, 2),  # B (600) and C (500)
    ({"tpot": 100}, 2),  # C exactly at the limit, B with no TPOT
])
def test_goodput_counts_requests_meeting_every_slo(slos, good):
    assert summarize([A, B, C, D], duration_s=5.0, slos=slos)["request_goodput"] == pytest.approx(good / 5)


def test_goodput_syntax_is_vllms():
    assert parse_goodput(["ttft:500", "tpot:50.5", "e2el:3000"]) == {"ttft": 500, "tpot": 50.5, "e2el": 3000}
    assert meets_slos(A, {"ttft": 100}) and not meets_slos(A, {"ttft": 99})
    for bad, message in (("itl:5", "KEY one of"), ("ttft", "KEY one of"), ("ttft:x", "not a number"),
                         ("tpot:-1", ">= 0"), ("ttft:nan", "finite"), ("e2el:inf", "finite")):
        with pytest.raises(ValueError, match=message):
            parse_goodput([bad])


def test_interference_takes_shorts_decoding_during_a_long_prefill():
    long = record(0, 1.0, [3.0], 3.2, kind="long")  # prefill window [1.0, 3.0]
    victim = record(1, 1.9, [2.0, 2.1, 3.5, 4.0], 4.0, kind="short")  # decodes [2.0, 4.0]; TPOT 2000/3 ms
    after = record(2, 4.9, [5.0, 5.5, 6.0], 6.0, kind="short")  # decodes [5, 6]; TPOT 500
    touching = record(3, 0.0, [0.2, 0.6, 1.0], 1.0, kind="short")  # decode ends as the prefill starts; TPOT 400
    one_token = record(4, 1.5, [2.5], 2.6, kind="short")  # no TPOT: neither victim nor quiet
    result = interference([long, victim, after, touching, one_token])
    assert (result["long_prefills"], result["victims"], result["quiet"]) == (1, 1, 2)
    assert result["p99_interference_tpot_ms"] == pytest.approx(2000 / 3)
    # the victim's gaps that overlap [1, 3]: 2.0-2.1 and 2.1-3.5, not 3.5-4.0
    assert result["victim_gaps"] == 2 and result["mean_interference_itl_ms"] == pytest.approx(750)
    assert result["mean_quiet_tpot_ms"] == pytest.approx(450)


def test_interference_with_no_long_request_has_no_victims():
    result = interference([A, C])
    assert result["long_prefills"] == 0 and result["victims"] == 0 and result["p99_interference_tpot_ms"] is None


def test_spread_lengths_stay_within_vllms_range():
    rng = np.random.default_rng(0)
    lengths = spread_lengths(rng, 100, 0.25, 5000)
    assert lengths.min() == 75 and lengths.max() == 125  # both ends drawn from 5000 uniform picks
    assert (spread_lengths(rng, 100, 0.0, 10) == 100).all()
    assert spread_lengths(rng, 3, 0.9, 1000).min() >= 1
    with pytest.raises(ValueError, match="range-ratio"):
        spread_lengths(rng, 100, 1.0, 1)


def test_random_requests_are_token_ids_in_the_vocab_without_eos():
    rng = np.random.default_rng(1)
    reqs = random_requests(50, rng, input_len=64, output_len=16, range_ratio=0.5, vocab_size=40,
                           eos_token_ids=[2, 7], max_model_len=256)
    assert all(32 <= r.prompt_len <= 96 and 8 <= r.output_len <= 24 for r in reqs)
    assert all(len(r.token_ids) == r.prompt_len and r.text is None for r in reqs)
    ids = {t for r in reqs for t in r.token_ids}
    assert ids <= set(range(40)) - {2, 7} and len(ids) == 38
    with pytest.raises(ValueError, match="over the model's context of 100"):
        random_requests(5, rng, input_len=90, output_len=16, range_ratio=0.0, vocab_size=40, eos_token_ids=[2],
                        max_model_len=100)


def test_a_random_prefix_is_shared_by_every_prompt_before_its_own_tokens():
    rng = np.random.default_rng(2)
    reqs = random_requests(20, rng, input_len=10, output_len=4, range_ratio=0.5, vocab_size=50,
                           eos_token_ids=[2], max_model_len=64, prefix_len=30)
    prefix = reqs[0].token_ids[:30]
    assert all(r.token_ids[:30] == prefix and len(r.token_ids) == r.prompt_len for r in reqs)
    assert all(35 <= r.prompt_len <= 45 for r in reqs) and 2 not in prefix
    assert len({r.token_ids[30:] for r in reqs}) == 20  # each prompt's own part differs
    with pytest.raises(ValueError, match="over the model's context of 64"):
        random_requests(5, rng, input_len=30, output_len=4, range_ratio=0.0, vocab_size=50, eos_token_ids=[2],
                        max_model_len=64, prefix_len=31)


def test_mixed_workload_has_the_asked_fraction_of_long_prompts():
    spec = MixedSpec(long_fraction=0.1, short_input_len=32, short_output_len=16, long_output_len=8)
    reqs = mixed_requests(100, np.random.default_rng(2), spec, range_ratio=0.0, vocab_size=50, eos_token_ids=[2],
                          max_model_len=512)
    longs = [i for i, r in enumerate(reqs) if r.kind == "long"]
    assert len(longs) == 10 and longs != list(range(10))  # exactly 10%, spread over the run
    assert all((r.prompt_len, r.output_len) == (448, 8) for r in reqs if r.kind == "long")  # 7/8 of 512
    assert all((r.prompt_len, r.output_len) == (32, 16) for r in reqs if r.kind == "short")
    spread = mixed_requests(50, np.random.default_rng(2), spec, range_ratio=0.5, vocab_size=50, eos_token_ids=[2],
                            max_model_len=512)  # the default long length is lowered to floor((512 - 12) / 1.5)
    assert max(r.prompt_len for r in spread if r.kind == "long") <= 500 and \
        max(r.prompt_len + r.output_len for r in spread) <= 512
    none = mixed_requests(20, np.random.default_rng(2), MixedSpec(long_fraction=0.0, long_input_len=100),
                          range_ratio=0.0, vocab_size=50, eos_token_ids=[2], max_model_len=512)
    assert {r.kind for r in none} == {"short"}


def test_the_same_seed_gives_the_same_workload():
    spec = WorkloadSpec(dataset="mixed", num_prompts=12, range_ratio=0.3, mixed=MixedSpec(long_fraction=0.25))
    model = dict(vocab_size=100, eos_token_ids=[2], max_model_len=4096)
    assert build_workload(spec, seed=5, **model) == build_workload(spec, seed=5, **model)
    assert build_workload(spec, seed=5, **model) != build_workload(spec, seed=6, **model)


class WordTokenizer:
    """One token per word, plus a BOS with special tokens (as the server encodes prompts)."""

    def encode(self, text, add_special_tokens=True):
        return [1] * add_special_tokens + [5] * len(text.split())


def test_sharegpt_takes_the_first_human_turn_and_filters_as_vllm(tmp_path):
    words = lambda n: " ".join(["w"] * n)  # noqa: E731
    conversations = [
        [("system", words(50)), ("human", words(9)), ("gpt", words(20)), ("human", words(3))],  # kept: 10 in, 20 out
        [("human", words(5)), ("gpt", words(300))],  # kept, output capped: 6 in, 256 out
        [("human", words(2)), ("gpt", words(20))],  # prompt 3 tokens < 4: skipped
        [("human", words(20)), ("gpt", words(2))],  # reply 2 tokens < 4: skipped
        [("human", words(1100)), ("gpt", words(10))],  # prompt over 1024: skipped
        [("human", words(20))],  # no reply: skipped
        [("gpt", words(20)), ("human", words(20))],  # no reply after the human turn: skipped
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([{"id": str(i), "conversations": [{"from": f, "value": v} for f, v in c]}
                                for i, c in enumerate(conversations)]))
    reqs = sharegpt_requests(4, np.random.default_rng(0), path, WordTokenizer(), max_model_len=2048,
                             max_output_len=256)
    assert sorted({(r.prompt_len, r.output_len) for r in reqs}) == [(6, 256), (10, 20)]
    assert len(reqs) == 4 and all(r.kind == "sharegpt" and r.text and r.token_ids is None for r in reqs)
    assert {r.text for r in reqs} == {words(9), words(5)}
    fixed = sharegpt_requests(2, np.random.default_rng(0), path, WordTokenizer(), max_model_len=2048, output_len=7)
    assert {r.output_len for r in fixed} == {7}
    short_context = sharegpt_requests(3, np.random.default_rng(0), path, WordTokenizer(), max_model_len=100)
    assert {(r.prompt_len, r.output_len) for r in short_context} == {(10, 20)}  # 6 + 256 > 100: skipped


def test_sharegpt_entries_of_another_shape_are_skipped_not_fatal(tmp_path):
    good = {"conversations": [{"from": "human", "value": "a b c d e"}, {"from": "gpt", "value": "f g h i j"}]}
    odd = [{"conversations": ["human: hi", "gpt: hello"]}, {"conversations": {"from": "human", "value": "x"}},
           {"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "f g h i j"}]},
           {"conversations": [{"from": "human", "value": "a b c d e"}, {"from": "gpt", "value": 12345}]},
           {"conversations": None}, "not an entry", 7]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(odd + [good]))
    reqs = sharegpt_requests(3, np.random.default_rng(0), path, WordTokenizer(), max_model_len=2048)
    assert {(r.text, r.prompt_len, r.output_len) for r in reqs} == {("a b c d e", 6, 5)}


def test_length_flags_of_zero_are_refused_not_replaced_by_defaults():
    for field in ("random_input_len", "random_output_len", "sharegpt_output_len", "sharegpt_max_output_len"):
        with pytest.raises(ValueError, match=f"--{field.replace('_', '-')} must be >= 1, got 0"):
            WorkloadSpec(**{field: 0})
    with pytest.raises(ValueError, match="--mixed-long-input-len must be >= 1, got 0"):  # it meant the default
        MixedSpec(long_input_len=0)


def test_a_short_mixed_run_still_has_a_long_prompt():
    """n * fraction is rounded half up and is at least 1: a 5-request warm-up used to get no long
    prompt (round(0.5) == 0), so the first timed long prefill compiled."""
    spec = MixedSpec(long_fraction=0.1)
    assert [spec.num_long(n) for n in (1, 3, 5, 10, 15, 25, 100)] == [1, 1, 1, 1, 2, 3, 10]
    assert MixedSpec(long_fraction=0.0).num_long(50) == 0 and MixedSpec(long_fraction=1.0).num_long(7) == 7


def test_arrivals_have_the_asked_rate_and_burstiness():
    rng = np.random.default_rng(3)
    for burstiness in (0.25, 1.0, 4.0):
        offsets = arrival_offsets(20001, 10.0, burstiness, rng)
        gaps = np.diff(offsets)
        assert offsets[0] == 0 and (gaps >= 0).all()
        assert gaps.mean() == pytest.approx(0.1, rel=0.05)
        assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.1)
    assert (arrival_offsets(5, float("inf"), 1.0, rng) == 0).all()
    for bad in (0.0, float("inf"), float("nan")):  # inf and NaN gave NaN gaps: everything sent at once
        with pytest.raises(ValueError, match="burstiness"):
            arrival_offsets(5, 1.0, bad, rng)
    with pytest.raises(ValueError, match="request-rate"):
        arrival_offsets(5, float("nan"), 1.0, rng)
    assert parse_rates("1, 2,inf") == [1.0, 2.0, float("inf")]
    for bad in ("0", "x", "", "nan"):
        with pytest.raises(ValueError, match="request-rate"):
            parse_rates(bad)


def test_comparison_table_has_ratios_and_the_interference_row():
    base = dict(label="colocated", metrics=dict(completed=10, mean_tpot_ms=20.0, p99_tpot_ms=80.0),
                interference=dict(p99_interference_tpot_ms=100.0, victims=4, long_prefills=2))
    other = dict(label="disaggregated", metrics=dict(completed=10, mean_tpot_ms=30.0, p99_tpot_ms=40.0),
                 interference=dict(p99_interference_tpot_ms=25.0, victims=3, long_prefills=2))
    table = comparison_table(base, other)
    assert "| TPOT mean (ms) | 20.00 | 30.00 | 1.50x |" in table
    assert "| TPOT p99 (ms) | 80.00 | 40.00 | 0.50x |" in table
    assert "shorts during long prefills (ms)** | 100.00 | 25.00 | 0.25x |" in table
    assert "| victims / long prefills | 4 / 2 | 3 / 2 | |" in table and "goodput" not in table


def test_result_block_prints_goodput_only_with_slos():
    doc = dict(label="", request_rate=2.0, metrics=summarize([A, B, C], 5.0, {"ttft": 250}))
    block = result_block(doc, max_concurrency=4, slos={"ttft": 250})
    assert "Serving Benchmark Result" in block and "Request goodput (req/s):" in block
    assert "Maximum request concurrency:             4" in block and "P99 TPOT (ms):" in block
    assert "goodput" not in result_block(dict(doc, metrics=summarize([A], 5.0)), max_concurrency=None, slos={})


def test_compare_puts_both_stacks_on_the_same_devices(monkeypatch):
    monkeypatch.delenv("SPLITSERVE_LOG_LEVEL", raising=False)  # launch_config reads it; the specs keep INFO
    (c_label, colocated), (d_label, disaggregated) = CompareSpec(platform="cpu").stacks()
    assert (c_label, colocated.mode, colocated.decode_workers) == ("colocated", "colocated", 2)
    assert (d_label, disaggregated.prefill_workers, disaggregated.decode_workers) == ("disaggregated", 1, 1)
    (_, wide), _ = CompareSpec(prefill_mesh=MeshConfig(2), decode_workers=2).stacks()
    assert wide.decode_workers == 4  # 2 + 2 devices as 4 colocated tp=1 workers
    with pytest.raises(ValueError, match="do not split"):
        CompareSpec(colocated_mesh=MeshConfig(2), prefill_mesh=MeshConfig(2)).stacks()
    args = build_parser().parse_args(["launch", *launch_flags(disaggregated)])
    assert (args.mode, args.platform, args.port, args.prefill_workers, args.max_batch, args.warmup) == \
        ("disaggregated", "cpu", 0, 1, 32, "full")
    # What launch would run: the same configs back (launch refuses prefill flags in colocated mode).
    for config in (colocated, disaggregated):
        assert launch_config(build_parser().parse_args(["launch", *launch_flags(config)])) == config
    (_, quick), _ = CompareSpec(warmup="minimal").stacks()  # `bench --compare --warmup minimal`
    assert build_parser().parse_args(["launch", *launch_flags(quick)]).warmup == "minimal"
    for config in (stack for _, stack in CompareSpec(platform="cpu", prefix_cache_gib=0.5,
                                                     prefill_chunk_tokens=256).stacks()):
        assert config.prefix_cache_gib == 0.5  # `bench --compare --enable-prefix-caching`: both stacks cache
        assert config.prefill_chunk_tokens == 256  # `--prefill-chunk-tokens 256`: both stacks chunk
        assert launch_config(build_parser().parse_args(["launch", *launch_flags(config)])) == config


def test_bad_flags_are_one_line_errors():
    with pytest.raises(SystemExit, match="--dataset sharegpt needs --dataset-path"):
        cli_bench.main(["--address", "127.0.0.1:1", "--dataset", "sharegpt"])
    with pytest.raises(SystemExit, match="KEY one of"):
        cli_bench.main(["--address", "127.0.0.1:1", "--goodput", "itl:5"])
    with pytest.raises(SystemExit, match="cannot reach 127.0.0.1:1: UNAVAILABLE"):
        cli_bench.main(["--address", "127.0.0.1:1"])
    with pytest.raises(SystemExit, match="--random-prefix-len applies to --dataset random, not mixed"):
        cli_bench.main(["--address", "127.0.0.1:1", "--dataset", "mixed", "--random-prefix-len", "8"])
    with pytest.raises(SystemExit, match="set up the --compare stacks"):
        cli_bench.main(["--address", "127.0.0.1:1", "--enable-prefix-caching"])
    with pytest.raises(SystemExit, match="--base-url needs --model"):
        cli_bench.main(["--base-url", "http://127.0.0.1:1"])
    with pytest.raises(SystemExit, match="cannot reach http://127.0.0.1:1/v1/models"):
        cli_bench.main(["--base-url", "http://127.0.0.1:1/v1/", "--model", "demo"])


def test_bench_against_a_launched_stack(tmp_path_factory):
    """8 mixed requests at two rates through the real CLI entry point: JSON, table and plots; the same
    workload through the stack's OpenAI-compatible HTTP server (--base-url) gives the same counts."""
    import re

    os.environ["SPLITSERVE_CACHE"] = str(tmp_path_factory.mktemp("bench-cache"))
    out, http_out = tmp_path_factory.mktemp("bench-out"), tmp_path_factory.mktemp("bench-http")
    workload = ["--dataset", "mixed", "--num-prompts", "8", "--mixed-long-fraction", "0.25",
                "--mixed-short-input-len", "12", "--mixed-short-output-len", "6", "--mixed-long-input-len", "100",
                "--mixed-long-output-len", "3", "--request-rate", "20,40", "--seed", "1", "--goodput", "ttft:60000",
                "--disable-tqdm"]
    with launched("demo", "--page-size", "8", "--num-pages", "256", "--max-batch", "8", "--openai-port", "0") as stack:
        code = cli_bench.main(["--address", stack.address, *workload, "--result-json", str(out / "result.json"),
                               "--plot-dir", str(out)])
        base_url = re.search(r"openai-server on (http://\S+)/v1", "".join(stack.lines)).group(1)
        http_code = cli_bench.main(["--base-url", base_url, "--model", "demo", *workload,
                                    "--result-json", str(http_out / "result.json")])
    assert code == 0 and http_code == 0
    http = json.loads((http_out / "result.json").read_text())
    assert http["model_info"]["mode"] == "openai" and http["model_info"]["name"] == "splitserve-demo-v2"
    doc = json.loads((out / "result.json").read_text())
    for run in http["runs"]:  # the usage's counts (a chunk may hold several tokens, or a part of a character)
        assert run["metrics"]["completed"] == 8 and run["metrics"]["total_output_tokens"] == 2 * 3 + 6 * 6
        for r in run["requests"]:
            assert r["success"], r["error"]
            assert r["output_tokens"] == r["output_len"] and r["prompt_len"] == (100 if r["kind"] == "long" else 12)
            assert 1 <= len(r["chunk_s"]) <= r["output_len"] and 0 < r["ttft_ms"] <= r["e2el_ms"]
    assert doc["model_info"]["max_model_len"] == 2048 and len(doc["runs"]) == 2
    for run, rate in zip(doc["runs"], (20.0, 40.0)):
        assert run["request_rate"] == rate
        requests = run["requests"]
        assert sorted(r["index"] for r in requests) == list(range(8))
        assert sum(r["kind"] == "long" for r in requests) == 2
        for r in requests:
            assert r["success"], r["error"]
            assert r["output_tokens"] == r["output_len"] == (3 if r["kind"] == "long" else 6)
            assert r["prompt_len"] == (100 if r["kind"] == "long" else 12)
            assert 0 < r["ttft_ms"] <= r["e2el_ms"] and r["tpot_ms"] > 0
            assert len(r["itl_ms"]) == len(r["chunk_s"]) - 1 and all(g >= 0 for g in r["itl_ms"])
            assert r["scheduled_s"] <= r["start_s"] < r["end_s"]
        m = run["metrics"]
        assert m["completed"] == 8 and m["failed"] == 0 and m["total_output_tokens"] == 2 * 3 + 6 * 6
        assert m["request_goodput"] == pytest.approx(m["request_throughput"])  # every TTFT is under a minute
        assert 0 < m["p50_tpot_ms"] <= m["p99_tpot_ms"] and m["mean_itl_ms"] > 0
        assert run["interference"]["long_prefills"] == 2
    for name in ("latency_cdf.png", "latency_vs_rate.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_request_failing_outside_the_sdk_is_recorded_not_fatal_to_the_run():
    import asyncio
    import time as _time

    from splitserve.runtime.serving_bench import driver
    from splitserve.runtime.serving_bench.workloads import BenchRequest

    class Broken:
        async def stream(self, **kwargs):
            raise RuntimeError("connection pool exploded")
            yield  # an async generator, as AsyncClient.stream is

    class Bar:
        def update(self, n):
            pass

    rec = RequestRecord(0, "random", 3, 2, 0.0)
    asyncio.run(driver._one(Broken(), BenchRequest(3, 2, "random", token_ids=(5, 6, 7)), rec,
                            _time.perf_counter(), None, Bar()))
    assert not rec.success and rec.error == "RuntimeError: connection pool exploded"


SSE_CASES = {  # path -> (status, body): what the canned server answers
    "/ok/v1/completions": (200, ['{"choices": [{"text": "a", "index": 0}]}', '{"choices": [{"text": "", "index": 0}]}',
                                 '{"choices": [{"text": "bc", "index": 0, "finish_reason": "length"}]}',
                                 '{"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5}}', "[DONE]"]),
    "/error/v1/completions": (200, ['{"choices": [{"text": "a"}]}', '{"error": {"message": "worker went away"}}',
                                    "[DONE]"]),
    "/busy/v1/completions": (429, "too many requests"),
    "/cut/v1/completions": (200, ['{"choices": [{"text": "a"}]}']),
    "/nousage/v1/completions": (200, ['{"choices": [{"text": "a"}]}', "[DONE]"]),
}


def test_the_http_driver_reads_streams_as_vllm_bench_serve_does():
    """openai_driver against canned answers: vLLM's shape (a last usage chunk with no choices; a chunk
    with empty text still an arrival; the usage's token count), an error event, a non-200, a stream cut
    before [DONE], and one without a usage chunk; the latency ends at the last chunk with choices."""
    import asyncio
    import time as _time

    from aiohttp import web

    from splitserve.runtime.serving_bench import openai_driver
    from splitserve.runtime.serving_bench.workloads import BenchRequest

    async def answer(request):
        status, body = SSE_CASES[request.path]
        if status != 200:
            return web.Response(status=status, text=body)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in body:
            await response.write(f"data: {event}\n\n".encode())
            await asyncio.sleep(0.02)
        return response

    class Bar:
        def update(self, n):
            pass

    async def main():
        app = web.Application()
        app.router.add_post("/{case}/v1/completions", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        records = {}
        try:
            for case in ("ok", "error", "busy", "cut", "nousage"):
                target = openai_driver.OpenAITarget(f"http://127.0.0.1:{port}/{case}", "m", None)
                rec = RequestRecord(0, "random", 3, 5, 0.0)
                await openai_driver.run(target, [BenchRequest(3, 5, "random", token_ids=(5, 6, 7))], [rec], None,
                                        None, Bar())
                records[case] = rec
        finally:
            await runner.cleanup()
        return records

    started = _time.perf_counter()
    records = asyncio.run(main())
    assert _time.perf_counter() - started < 30
    ok = records["ok"]
    assert ok.success and ok.chunk_tokens == [1, 1, 3] and ok.output_tokens == 5 and ok.prompt_len == 7
    assert ok.end_s == ok.chunk_s[-1] and len(ok.itl_s) == 2  # not the usage chunk nor [DONE]
    assert records["error"].error == "error event: worker went away"
    assert records["busy"].error == "HTTP 429: too many requests"
    assert "before data: [DONE]" in records["cut"].error and "no usage chunk" in records["nousage"].error
    assert openai_driver.spread(3, 2) == [1, 1, 0] and openai_driver.spread(0, 4) == []
