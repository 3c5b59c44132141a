"""`splitserve` command line, run as a real subprocess."""

import json
import os
import subprocess
import sys

import pytest


def run_cli(*args, cache):
    env = dict(os.environ, SPLITSERVE_CACHE=str(cache), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "splitserve.runtime.cli", *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cli-cache")


def test_generate_json_matches_in_process_engine(cache, hf_checkpoint):
    directory, _ = hf_checkpoint("llama3_gqa3_hd40_ropescale")
    result = run_cli("generate", "--model", str(directory), "--prompt-ids", "1,5,9,33,7",
                     "--max-tokens", "6", "--ignore-eos", "--json", cache=cache)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(out) == {"text", "token_ids", "prompt_token_ids", "finish_reason", "ttft_s", "latency_s"}
    assert out["prompt_token_ids"] == [1, 5, 9, 33, 7] and out["finish_reason"] == "length"

    import torch
    from hf_checkpoints import hf_greedy

    assert out["token_ids"] == hf_greedy(hf_checkpoint("llama3_gqa3_hd40_ropescale")[1], [1, 5, 9, 33, 7], 6)
    assert 0 < out["ttft_s"] <= out["latency_s"]
    with_logprobs = run_cli("generate", "--model", str(directory), "--prompt-ids", "1,5,9,33,7", "--max-tokens", "3",
                            "--ignore-eos", "--json", "--logprobs", "2", cache=cache)
    logprobs = json.loads(with_logprobs.stdout.strip().splitlines()[-1])["logprobs"]
    assert [len(lp["top"]) for lp in logprobs] == [2, 2, 2] and all(lp["logprob"] <= 0 for lp in logprobs)
    assert [lp["top"][0][0] for lp in logprobs] == out["token_ids"][:3]  # greedy: each token is the likeliest
    penalised = run_cli("generate", "--model", str(directory), "--prompt-ids", "1,5,9,33,7", "--max-tokens", "6",
                        "--ignore-eos", "--json", "--repetition-penalty", "0.5", cache=cache)
    torch_model = hf_checkpoint("llama3_gqa3_hd40_ropescale")[1]
    with torch.no_grad():  # transformers' own repetition penalty
        want = torch_model.generate(torch.tensor([[1, 5, 9, 33, 7]]), max_new_tokens=6, do_sample=False,
                                    pad_token_id=0, repetition_penalty=0.5)[0, 5:].tolist()
    assert json.loads(penalised.stdout.strip().splitlines()[-1])["token_ids"] == want != out["token_ids"]


def test_generate_chat_renders_the_models_template_as_transformers_does(cache):
    transformers = pytest.importorskip("transformers")
    result = run_cli("generate", "The weather?", "--chat", "--system", "Be brief.", "--max-tokens", "3", "--json",
                     cache=cache)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    demo_dir = next(p for p in cache.iterdir() if p.name.startswith("demo-"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The weather?"}]
    want = transformers.AutoTokenizer.from_pretrained(demo_dir).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True)
    assert out["prompt_token_ids"] == list(want["input_ids"] if hasattr(want, "keys") else want)


def test_generate_streams_demo_text(cache):
    result = run_cli("generate", "Once upon a time", "--max-tokens", "8", cache=cache)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    chosen = run_cli("generate", "Once upon a time", "--max-tokens", "8", "--temperature", "1",
                     "--structured-outputs", '{"choice": ["north wind", "south"]}', cache=cache)
    assert chosen.returncode == 0, chosen.stderr
    assert chosen.stdout.strip() in ("north wind", "south")


@pytest.mark.parametrize("args, message", [
    (["generate"], "exactly one of PROMPT or --prompt-ids"),
    (["generate", "hi", "--top-p", "2"], "top_p must be in (0, 1]"),
    (["generate", "hi", "--max-tokens", "2", "--min-tokens", "3"], "min_tokens must be in [0, max_tokens=2], got 3"),
    (["generate", "hi", "--logprobs", "21", "--json"], "logprobs must be in [0, 20]"),
    (["generate", "hi", "--logprobs", "2"], "--logprobs goes with --json"),
    (["generate", "hi", "--prompt-logprobs", "2"], "--prompt-logprobs goes with --json"),
    (["generate", "hi", "--repetition-penalty", "0"], "repetition_penalty must be in [0.01, 100]"),
    (["generate", "hi", "--min-p", "1.5"], "min_p must be in [0, 1]"),
    (["generate", "hi", "--logit-bias", "5"], "--logit-bias takes ID=BIAS (e.g. 42=-100), got '5'"),
    (["generate", "hi", "--logit-bias", "5=-101"], "logit_bias values must be in [-100, 100]"),
    (["generate", "hi", "--allowed-token-ids", "7,99999"], "outside the vocabulary"),
    (["generate", "hi", "--structured-outputs", '{"regexp": "a"}'], "unknown structured_outputs field regexp"),
    (["generate", "hi", "--structured-outputs", '{"regex": "[a"}'], "unclosed character class"),
    (["generate", "hi", "--allowed-token-ids", "7,x"], "--allowed-token-ids: must be comma-separated integers"),
    (["generate", "hi", "--presence-penalty", "3"], "presence_penalty must be in [-2, 2]"),
    (["generate", "hi", "--truncate-prompt-tokens", "0"], "truncate_prompt_tokens must be -1"),
    (["generate", "--prompt-ids", "1,x"], "comma-separated integers"),
    (["generate", "hi", "--mesh", "dp=2"], "not of the form 'tp=N'"),
    (["nonsense"], "invalid choice"),
    (["launch", "--tls-cert", "/nope.crt", "--tls-key", "/nope.key", "--tls-ca", "/nope-ca.crt"],
     "cannot read the TLS certificate /nope.crt"),
    (["decode-worker", "--tls-cert", "/nope.crt"], "--tls-cert and --tls-key go together"),
    (["router", "--colocated", "a:1", "--api-key-file", "/nope.key"], "cannot read the API key file /nope.key"),
    (["generate", "hi", "--page-size", "0"], "--page-size: must be >= 1, got 0"),
    (["generate", "hi", "--system", "Be brief."], "--system goes with --chat"),
    (["generate", "--prompt-ids", "1,2", "--chat"], "--chat takes PROMPT (the user's message), not --prompt-ids"),
    # Flags that had no effect where they were given are refused, not ignored.
    (["launch", "--mode", "colocated", "--prefill-workers", "2"], "--prefill-workers applies to --mode disaggregated"),
    (["launch", "--mode", "colocated", "--prefill-mesh", "tp=2"], "--prefill-mesh applies to --mode disaggregated"),
    (["decode-worker", "--kv-transport", "grpc", "--kv-data-port", "7000"], "--kv-transport grpc does not open"),
    (["router", "--colocated", "a:1", "--page-size", "8"], "unrecognized arguments: --page-size"),
    (["router", "--colocated", "a:1", "--worker-start-timeout-s", "0"], "--worker-start-timeout-s must be > 0"),
    (["launch", "--worker-start-timeout-s", "nan"], "worker_start_timeout_s must be > 0"),
    (["batch", "--input", "in.jsonl", "--output", "out.jsonl", "--max-batch", "0"], "--max-batch: must be >= 1"),
    (["launch", "--num-pages", "-3"], "--num-pages: must be >= 1, got -3"),
    (["batch", "--input", "in.jsonl", "--output", "out.jsonl", "--model", "demo", "--tool-call-parser", "hermes"],
     "--tool-call-parser reads calls into --output-format openai lines"),
    (["launch", "--tool-call-parser", "hermes"], "--tool-call-parser is for the OpenAI-compatible server"),
    # gRPC wrapped these (70000 listened on 4464, -1 on 65535); the HTTP ones crashed after start-up.
    (["launch", "--port", "70000"], "--port: must be in [0, 65535], got 70000"),
    (["router", "--colocated", "a:1", "--metrics-port", "-1"], "--metrics-port: must be in [0, 65535], got -1"),
    # Tracebacks before: a checkpoint that does not load is one line naming it.
    (["convert", "/nope/model", "out-dir"], "splitserve convert: model path '/nope/model' is not a directory"),
    (["colocated-worker", "--model", "/nope/model"], "splitserve colocated-worker: model path '/nope/model'"),
    (["generate", "hi", "--model", "/nope/model"], "/nope/model"),
    # "" was Path("."): the current directory was read as the checkpoint ("." has no config.json).
    (["launch", "--model", ""], "splitserve launch: the model path is empty: give a checkpoint directory"),
    (["generate", "hi", "--model", " "], "splitserve generate: the model path is empty"),
    (["generate", "hi", "--address", "127.0.0.1:1", "--seed", "-1"], "seed must be in [0, "),
    # It sized a KV cache for 2**31 tokens first (a 1 TB allocation, out of memory) before checking.
    (["generate", "hi", "--max-tokens", "2147483647"], "exceeds the model's context of 2048"),
])
def test_bad_flags_exit_nonzero_with_a_reason(cache, args, message):
    result = run_cli(*args, cache=cache)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


def test_generate_text_on_a_model_without_a_tokenizer_asks_for_token_ids(cache, hf_checkpoint):
    directory, _ = hf_checkpoint("qwen2_bias_mqa_tied")  # saved by transformers, no tokenizer.json
    result = run_cli("generate", "hi", "--model", str(directory), "--max-tokens", "2", cache=cache)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "has no tokenizer (tokenizer.json): give --prompt-ids" in result.stderr


def test_help_lists_commands_and_flags(cache):
    top = run_cli("--help", cache=cache)
    assert top.returncode == 0
    for command in ("demo", "generate", "batch", "bench", "launch", "router", "prefill-worker", "decode-worker",
                    "colocated-worker", "convert"):
        assert command in top.stdout
        assert run_cli(command, "--help", cache=cache).returncode == 0
    gen = run_cli("generate", "--help", cache=cache)
    for flag in ("--model", "--max-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--stop",
                 "--ignore-eos", "--prompt-ids", "--json", "--dtype"):
        assert flag in gen.stdout


def test_demo_runs_the_stack_streams_and_stops(cache):
    result = run_cli("demo", "--platform", "cpu", "--max-tokens", "8", cache=cache)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "TTFT s" in out and "mode disaggregated" in out and "stopped every worker" in out
    rows = [line.split() for line in out.splitlines() if line[:2].strip().isdigit() and "length" in line]
    assert len(rows) == 4 and all(int(r[2]) == 8 for r in rows)  # 4 requests, 8 tokens each
    assert "prefill  phase ran on cpu mesh tp=1" in out and "decode   phase ran on cpu mesh tp=1" in out


def test_serving_commands_document_their_security_flags(cache):
    common = ("--tls-cert", "--tls-key", "--tls-ca", "--allow-insecure")
    for command, extra in {"launch": ("--api-key-file", "SPLITSERVE_API_KEY"),
                           "router": ("--api-key-file", "--internal-token-file", "SPLITSERVE_INTERNAL_TOKEN"),
                           "prefill-worker": ("--internal-token-file",), "decode-worker": ("--internal-token-file",),
                           "colocated-worker": ("--internal-token-file",)}.items():
        text = run_cli(command, "--help", cache=cache).stdout
        assert all(flag in text for flag in common + extra), command
    for command, flags in {"launch": ("--kv-transport",), "decode-worker": ("--kv-transport", "--kv-data-port")}.items():
        text = run_cli(command, "--help", cache=cache).stdout
        assert all(flag in text for flag in flags) and "one-time ticket" in text, command
