"""`splitserve generate`: one completion, streamed to stdout, in-process (colocated)."""

from __future__ import annotations

import argparse
import json
import sys

from splitserve.runtime.cli_args import positive_int
from splitserve.runtime.cli_client import add_router_client_flags, client_options
from splitserve.runtime.platform_setup import configure_jax


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}")


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate one completion (in-process, or from a running router)",
                       description="Generate one completion and stream it to stdout. With --address it "
                                   "comes from a running router; without, the model runs in this process "
                                   "on one mesh (colocated prefill and decode).")
    p.add_argument("prompt", nargs="?", help="prompt text (or use --prompt-ids)")
    p.add_argument("--prompt-ids", type=_token_ids, help="token ids instead of text, e.g. 1,2,3")
    p.add_argument("--chat", action="store_true",
                   help="PROMPT is a user message: render it with the model's chat template (as a chat model expects)")
    p.add_argument("--system", metavar="TEXT", help="with --chat: a system message before the user's")
    p.add_argument("--address", help="HOST:PORT of a running router (default: run the model in-process)")
    add_router_client_flags(p)
    p.add_argument("--model", default="demo", help="HF directory, Orbax checkpoint, or 'demo' (default)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="serving dtype; auto = the checkpoint's own")
    p.add_argument("--mesh", default="tp=1", help="in-process mesh, e.g. tp=2 (default tp=1)")
    p.add_argument("--platform", choices=["cpu", "gpu", "tpu"], help="JAX platform (default: JAX's choice)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (default)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="in [0, 1]: sample only tokens at least min_p times as likely as the most likely "
                        "(default 0: off)")
    p.add_argument("--seed", type=int, help="sampling seed; the same seed gives the same tokens")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    p.add_argument("--min-tokens", type=int, default=0,
                   help="generate at least this many tokens before EOS, a stop token or a stop string may end it")
    p.add_argument("--logprobs", type=int, metavar="N",
                   help="with --json: each token's logprob and the N (0-20) most likely tokens' (key \"logprobs\")")
    p.add_argument("--prompt-logprobs", type=int, metavar="N",
                   help="with --json: each prompt token's logprob (after the first) and the N (0-20) most likely "
                        "there (key \"prompt_logprobs\")")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="in [-2, 2]: subtracted from the logit of each token generated before (default 0)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="in [-2, 2]: subtracted once per time a token was generated before (default 0)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="in [0.01, 100]: divides positive (multiplies negative) logits of tokens in the prompt "
                        "or generated before (default 1: off)")
    p.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                   help="add BIAS (in [-100, 100]) to token ID's logit before sampling (repeatable)")
    p.add_argument("--allowed-token-ids", type=_token_ids, metavar="IDS",
                   help="sample only these token ids, e.g. 5,9,42")
    p.add_argument("--structured-outputs", type=_structured_outputs, metavar="JSON",
                   help='hold the output to a spec, as vLLM\'s structured_outputs: one of {"json": SCHEMA}, '
                        '{"json_object": true}, {"regex": "..."}, {"choice": [...]}, {"grammar": "LARK"}')
    p.add_argument("--truncate-prompt-tokens", type=int, metavar="K",
                   help="keep only the prompt's last K tokens (-1: at most the model's context length)")
    p.add_argument("--page-size", type=positive_int, default=16, help="KV cache page size in tokens (default 16)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object {text, token_ids, prompt_token_ids, finish_reason, ttft_s, latency_s"
                        "[, logprobs][, prompt_logprobs][, stop_reason]}")
    p.set_defaults(run=run)


def _messages(args) -> list[dict[str, str]] | None:
    """The chat of --chat (and --system), or None for a plain prompt."""
    if args.system is not None and not args.chat:
        raise SystemExit("splitserve generate: --system goes with --chat")
    if not args.chat:
        return None
    if args.prompt is None:
        raise SystemExit("splitserve generate: --chat takes PROMPT (the user's message), not --prompt-ids")
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    return system + [{"role": "user", "content": args.prompt}]


def run(args) -> int:
    if (args.prompt is None) == (args.prompt_ids is None):
        raise SystemExit("splitserve generate: give exactly one of PROMPT or --prompt-ids")
    args.messages = _messages(args)
    for flag, value in (("--logprobs", args.logprobs), ("--prompt-logprobs", args.prompt_logprobs)):
        if value is not None and not args.json:
            raise SystemExit(f"splitserve generate: {flag} goes with --json (streamed text has no place for them)")
    if args.address:
        return _run_remote(args)
    from splitserve.models.mesh_config import MeshConfig
    from splitserve.runtime.sampling_params import SamplingParams  # no JAX: bad flags fail before it loads

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, stop=tuple(args.stop),
                                ignore_eos=args.ignore_eos, min_tokens=args.min_tokens, logprobs=args.logprobs,
                                **_more_sampling(args))
    except ValueError as e:
        raise SystemExit(f"splitserve generate: {e}")
    try:
        mesh_config = MeshConfig.parse(args.mesh)
    except ValueError as e:
        raise SystemExit(f"splitserve generate: --mesh: {e}")
    configure_jax(args.platform, cpu_devices=mesh_config.tp)

    from splitserve.runtime.colocated_engine import ColocatedEngine, EngineConfig
    from splitserve.runtime.in_process import generate_stream, load_for_serving
    try:
        model = load_for_serving(args.model, mesh_config, args.dtype)
    except (OSError, ValueError) as e:  # no such model, a checkpoint it cannot read
        raise SystemExit(f"splitserve generate: {e}")
    if args.prompt_ids is None and model.tokenizer is None:
        raise SystemExit(f"splitserve generate: {args.model} has no tokenizer (tokenizer.json): give --prompt-ids")
    prompt_ids = params.truncated(_prompt_ids(args, model), model.config.max_model_len)
    needed = len(prompt_ids) + args.max_tokens
    if needed > model.config.max_model_len:  # before sizing the cache for it (2**31 tokens: a 1 TB cache)
        raise SystemExit(f"splitserve generate: prompt ({len(prompt_ids)} tokens) + max_tokens ({args.max_tokens}) "
                         f"exceeds the model's context of {model.config.max_model_len}")
    engine = ColocatedEngine(model, EngineConfig(page_size=args.page_size, num_pages=2 + -(-needed // args.page_size),
                                                 max_batch=1, max_prefill_batch=1))
    try:
        stream = generate_stream(engine, prompt_ids, params)
        completion = None
        for delta, completion in stream:
            if not args.json and delta:
                sys.stdout.write(delta)
                sys.stdout.flush()
    except ValueError as e:
        raise SystemExit(f"splitserve generate: {e}")
    if args.json:
        print(json.dumps(completion.to_json_dict()))
    else:
        sys.stdout.write("\n")
    return 0


def _more_sampling(args) -> dict:
    return dict(min_p=args.min_p, presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                repetition_penalty=args.repetition_penalty, truncate_prompt_tokens=args.truncate_prompt_tokens,
                logit_bias=_logit_bias(args.logit_bias), allowed_token_ids=args.allowed_token_ids,
                prompt_logprobs=args.prompt_logprobs, structured_outputs=args.structured_outputs)


def _structured_outputs(text: str):
    from splitserve.runtime.structured_outputs import structured_outputs

    try:
        return structured_outputs(json.loads(text))
    except ValueError as e:  # JSON's errors are ValueErrors too
        raise argparse.ArgumentTypeError(f"not a structured outputs spec: {e}") from None


def _logit_bias(pairs: list[str]) -> dict[int, float]:
    bias = {}
    for pair in pairs:
        token, _, value = pair.partition("=")
        try:
            bias[int(token)] = float(value)  # no "=": float("") fails
        except ValueError:
            raise SystemExit(f"splitserve generate: --logit-bias takes ID=BIAS (e.g. 42=-100), got {pair!r}") from None
    return bias


def _prompt_ids(args, model) -> list[int]:
    if args.prompt_ids is not None:
        return args.prompt_ids
    if args.messages is None:
        return model.tokenizer.encode(args.prompt)
    if model.chat_template is None:
        raise SystemExit(f"splitserve generate: {args.model} has no chat template (chat_template.jinja or "
                         "tokenizer_config.json's chat_template): leave out --chat")
    try:
        text = model.chat_template.render(args.messages)
    except ValueError as e:  # the template refused the chat
        raise SystemExit(f"splitserve generate: {e}")
    return model.tokenizer.encode(text, add_special_tokens=False)  # the template wrote its special tokens


def _run_remote(args) -> int:
    import time

    from splitserve.runtime.client import Client, SplitserveError
    from splitserve.runtime.client_types import CompletionBuilder

    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
                    min_tokens=args.min_tokens, logprobs=args.logprobs, **_more_sampling(args))
    builder = CompletionBuilder(time.perf_counter(), args.prompt_logprobs is not None)
    try:
        with Client(args.address, **client_options(args)) as client:
            prompt = None if args.messages else args.prompt
            for chunk in client.stream(prompt, token_ids=args.prompt_ids, messages=args.messages, **sampling):
                builder.add(chunk, time.perf_counter())
                if not args.json and chunk.text:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
    except (SplitserveError, ValueError) as e:  # ValueError: a value the request cannot carry
        raise SystemExit(f"splitserve generate: {e}")
    if args.json:
        print(json.dumps(builder.build(time.perf_counter()).to_json_dict()))
    else:
        sys.stdout.write("\n")
    return 0
