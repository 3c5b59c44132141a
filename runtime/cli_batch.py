"""`splitserve batch` / `python scripts/batch_infer.py`: offline batch inference over a JSONL file.

Flags map onto batch_runner's backends; the loop, the file handling and resume live there.
"""

from __future__ import annotations

import argparse
import json
import sys

from splitserve.runtime.batch_output import FORMATS
from splitserve.runtime.cli_args import add_prefix_cache_flags, positive_int, prefix_cache_gib
from splitserve.runtime.cli_client import add_router_client_flags, client_options
from splitserve.runtime.cli_openai import add_tool_flags, tool_call_parser

DESCRIPTION = """\
Run every request of a JSONL file and append one result line per request to the output.

Input lines, either format:
  {"id": "a", "prompt": "text", "max_tokens": 32, "temperature": 0, "top_p": 1, "top_k": 0,
   "seed": 1, "stop": ["\\n"], "stop_token_ids": [2], "ignore_eos": false,
   "min_tokens": 0, "logprobs": 2}
  {"id": 7, "prompt_token_ids": [1, 260, 386]}
  {"id": "c", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
  {"custom_id": "a", "method": "POST", "url": "/v1/completions",
   "body": {"prompt": "text", "max_tokens": 32, "temperature": 0.7, "top_p": 0.9, "seed": 1, "stop": "."}}
  {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
   "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}}
Chat messages are rendered by the model's chat template (chat_template.jinja or
tokenizer_config.json's chat_template, as transformers' apply_chat_template renders them), ending
where the assistant's answer begins; with a model that has no chat template, a chat line gets an
error. Absent fields take splitserve's defaults: max_tokens 16, greedy (temperature 0) --
not OpenAI's temperature 1.

Output lines: {"id", "text", "token_ids", "finish_reason", "prompt_tokens"}, plus "logprobs":
[{"logprob", "top": [[token id, logprob], ...]}, ...] for a line with "logprobs": N (OpenAI
lines: body.logprobs N for completions; body.logprobs true and body.top_logprobs N for chat),
or {"id", "error"}
for a line that cannot run (the error names the problem and the input line). Every input line
gives exactly one output line; a line without a usable id (bad JSON, no id, a duplicate id)
gets the id "line-N". Lines are written as requests finish, so the order differs from the
input: match on id. Blank input lines are ignored.
With --output-format openai the lines are the OpenAI Batch API's (as vLLM's run-batch writes
them): {"id", "custom_id", "response": {"status_code": 200, "request_id", "body": a text
completion, or a chat completion for a chat line}, "error": null}, or status_code 400 and
"error": the message; match on custom_id. Logprobs there take OpenAI's shapes (tokens named by
their text with the model's tokenizer: in-process its own, with --address --tokenizer MODEL, else
"token_id:N"), and a completions body's "echo" is served as openai-server serves it, and so are a
chat body's "tools" and "tool_choice" (with --tool-call-parser for "auto"): the calls come in the
choice's message.tool_calls.

Resume: re-run with the same --output after a crash or Ctrl-C; ids already in the file are
skipped and a torn last line is cut off first, so nothing is repeated and nothing lost.
"""

IN_PROCESS_DEFAULTS = dict(max_batch=16, page_size=16, num_pages=1024, dtype="auto", mesh="tp=1", platform=None)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="JSONL file of requests")
    p.add_argument("--output", required=True, help="JSONL file to append results to (resumed if it exists)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="run in this process: HF directory, Orbax checkpoint, or 'demo'")
    where.add_argument("--address", help="HOST:PORT of a running router")
    add_router_client_flags(p)
    p.add_argument("--concurrency", type=int, help="requests in flight to the router (with --address; default 32)")
    p.add_argument("--tokenizer", metavar="MODEL", help="with --address and --output-format openai: the model's "
                   "directory or 'demo', to name logprobs' tokens by their text (else \"token_id:N\") and echo "
                   "prompts given as token ids (in-process: the model's own)")
    p.add_argument("--max-batch", type=positive_int, help="requests decoded together (in-process; default 16)")
    p.add_argument("--page-size", type=positive_int, help="KV cache page size in tokens (in-process; default 16)")
    p.add_argument("--num-pages", type=positive_int, help="KV cache pages (in-process; default 1024)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], help="serving dtype (in-process; default auto)")
    p.add_argument("--mesh", help="mesh, e.g. tp=2 (in-process; default tp=1)")
    p.add_argument("--platform", choices=["cpu", "gpu", "tpu"], help="JAX platform (in-process; default JAX's choice)")
    add_prefix_cache_flags(p, "this process (in-process)")
    p.add_argument("--output-format", choices=FORMATS, default="native",
                   help="native (default): {id, text, token_ids, finish_reason, prompt_tokens} lines; openai: the "
                        "OpenAI Batch API's output lines, {id, custom_id, response: {status_code, request_id, "
                        "body}, error}, with a text or chat completion body (as vLLM's run-batch writes them)")
    add_tool_flags(p, "with --output-format openai: ")
    p.add_argument("--json-summary", help="also write the summary as JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def add_parser(sub) -> None:
    p = sub.add_parser("batch", help="offline batch inference over a JSONL file (in-process or via a router)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(run=run)


def build_parser(prog: str = "batch_infer.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args) -> int:
    from splitserve.runtime.batch_runner import BatchAborted, run_batch

    from splitserve.runtime.batch_output import NativeOutput, OpenAIOutput

    try:
        parser = tool_call_parser(args)
        if parser is not None and args.output_format != "openai":
            raise ValueError("--tool-call-parser reads calls into --output-format openai lines")
        backend, close, model_name, tokenizer = _remote_backend(args) if args.address else _in_process_backend(args)
    except (OSError, ValueError) as e:  # a bad flag value, a model that does not load
        raise SystemExit(f"splitserve batch: {e}")
    output = OpenAIOutput(model_name, tokenizer, parser) if args.output_format == "openai" else NativeOutput()
    try:
        stats = run_batch(args.input, args.output, backend, progress=not args.no_progress, output=output)
    except BatchAborted as e:
        raise SystemExit(f"splitserve batch: stopped: {e}\nre-run the same command to resume")
    except (OSError, ValueError) as e:  # unreadable input, an output file that is not ours
        raise SystemExit(f"splitserve batch: {e}")
    finally:
        close()
    print(stats.summary_line())
    if args.json_summary:
        with open(args.json_summary, "w") as f:
            json.dump(stats.to_json_dict(), f, indent=2)
    return 0


def _in_process_backend(args):
    given = [f"--{k.replace('_', '-')}" for k in ("concurrency", "api_key", "tls", "tls_ca", "tokenizer")
             if getattr(args, k) not in (None, False)]
    if given:
        raise ValueError(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} only with --address")
    for key, default in IN_PROCESS_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    from splitserve.models.mesh_config import MeshConfig
    from splitserve.runtime.platform_setup import configure_jax

    mesh_config = MeshConfig.parse(args.mesh)
    configure_jax(args.platform, cpu_devices=mesh_config.tp)

    from splitserve.runtime.batch_runner import InProcessBackend
    from splitserve.runtime.colocated_engine import ColocatedEngine, EngineConfig
    from splitserve.runtime.in_process import load_for_serving

    from splitserve.runtime.worker import prefix_cache_pages

    model = load_for_serving(args.model, mesh_config, args.dtype)
    prefix_pages = prefix_cache_pages(prefix_cache_gib(args, "batch"), model, args.page_size, mesh_config.tp)
    engine = ColocatedEngine(model, EngineConfig(page_size=args.page_size, num_pages=args.num_pages,
                                                 max_batch=args.max_batch,
                                                 max_prefill_batch=min(8, args.max_batch),
                                                 prefix_cache_pages=prefix_pages))
    return InProcessBackend(engine), lambda: None, model.name, model.tokenizer


def _remote_backend(args):
    given = [f"--{k.replace('_', '-')}" for k in IN_PROCESS_DEFAULTS if getattr(args, k) is not None]
    given += [flag for flag, on in (("--enable-prefix-caching", args.enable_prefix_caching),
                                    ("--prefix-cache-gib", args.prefix_cache_gib is not None)) if on]
    if given:
        verb = "apply" if len(given) > 1 else "applies"
        raise ValueError(f"{', '.join(given)} {verb} only with --model (in-process)")
    from splitserve.runtime.batch_runner import RemoteBackend
    from splitserve.runtime.client import Client

    from splitserve.runtime.client import SplitserveError

    tokenizer = None
    if args.tokenizer:
        if args.output_format != "openai":
            raise ValueError("--tokenizer names tokens in --output-format openai lines; native lines name them "
                             "by id")
        from splitserve.models.metadata import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    client = Client(args.address, **client_options(args))
    try:
        model_name = client.model_info().name if args.output_format == "openai" else ""
    except SplitserveError as e:
        client.close()
        raise ValueError(f"cannot ask {args.address} for its model's name: {e}")
    backend = RemoteBackend(client, 32 if args.concurrency is None else args.concurrency)
    return backend, client.close, model_name, tokenizer


if __name__ == "__main__":
    sys.exit(main())
