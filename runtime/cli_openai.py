"""`splitserve openai-server`: an OpenAI-compatible HTTP server in front of a running router.

The server itself is runtime/openai_server.py; this module parses flags, waits for the router,
binds the port and stops on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import sys

from splitserve.runtime.cli_args import port
from splitserve.runtime.cli_client import add_router_client_flags, client_options

DESCRIPTION = """\
Serve OpenAI's completions and chat completions API over HTTP, in front of a running router
(`splitserve launch` prints its address), so that OpenAI's client libraries and tools work.
`splitserve launch --openai-port 8000` starts this server beside its router in one command.

  splitserve launch --port 50051 &
  splitserve openai-server --address 127.0.0.1:50051 --port 8000
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "demo", "prompt": "Once upon a time", "max_tokens": 16}'

Endpoints: POST /v1/completions, POST /v1/chat/completions ("stream": true gives server-sent
events, with "stream_options": {"include_usage": true} a last chunk with the usage), GET /v1/models,
GET /health, GET /metrics (Prometheus). Bodies are read as vLLM reads them (its extra fields top_k,
min_p, stop_token_ids, ignore_eos, repetition_penalty, ... are taken). Absent fields take splitserve's defaults:
max_tokens 16 and greedy decoding (temperature 0), not OpenAI's temperature 1. Completions take
several prompts in one body, echo (with max_tokens 0: the prompt alone) and vLLM's prompt_logprobs,
as lm-evaluation-harness's local-completions scoring sends them. Logprobs name tokens by their text
with --tokenizer (the model's directory, or 'demo'; echo of token-id prompts needs it), else
"token_id:N", as vLLM's --return-tokens-as-token-ids names them.
With an API key (--api-key or $SPLITSERVE_API_KEY: the router's), /v1/ paths want
"Authorization: Bearer KEY". HTTPS with --tls-cert/--tls-key; as every splitserve listener, it
serves plain HTTP on loopback only unless --allow-insecure. --tls / --tls-ca are about the router:
talk TLS to it, verified with the system's roots or that CA.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("openai-server", help="OpenAI-compatible HTTP server in front of a running router",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", required=True, help="HOST:PORT of the router")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=port, default=8000, help="HTTP port (default 8000; 0: any free port)")
    p.add_argument("--served-model-name", help="the model name requests give and responses report "
                   "(default: the router's)")
    p.add_argument("--tokenizer", metavar="MODEL", help="the model's directory (HF or Orbax) or 'demo', for "
                   "its tokenizer: logprobs then name tokens by their text (without it: \"token_id:N\"), and "
                   "echo can show prompts given as token ids")
    p.add_argument("--shutdown-timeout-s", type=float, default=60.0,
                   help="on SIGTERM/SIGINT, how long requests in flight get to finish (default 60)")
    p.add_argument("--wait-s", type=float, default=60.0,
                   help="how long to wait for the router to answer at start (default 60)")
    p.add_argument("--tls-cert", "--ssl-certfile", metavar="PEM", help="serve HTTPS with this certificate chain "
                   "(vLLM's --ssl-certfile is taken too); any non-loopback --host needs it or --allow-insecure")
    p.add_argument("--tls-key", "--ssl-keyfile", metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--allow-insecure", action="store_true", help="serve plain HTTP on a non-loopback --host "
                   "(API keys and prompts then cross the network readable)")
    add_tool_flags(p)
    add_router_client_flags(p)
    p.set_defaults(run=run)


def add_tool_flags(p, prefix: str = "") -> None:
    """--tool-call-parser, and vLLM's --enable-auto-tool-choice beside it (taken so that vLLM's command
    lines work; the parser alone turns "auto" on)."""
    from splitserve.runtime.tool_parsers import PARSERS

    p.add_argument("--tool-call-parser", choices=sorted(PARSERS), help=f"{prefix}how the model writes tool calls: "
                   "chat requests with tools and tool_choice \"auto\" then get them as tool_calls (hermes: "
                   "Qwen2.5/Qwen3/Hermes' <tool_call> JSON; llama3_json: Llama 3.1+'s JSON; mistral: [TOOL_CALLS]). "
                   "Without it \"auto\" "
                   "is refused; \"required\" and a named function work without it")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="vLLM's flag, taken for its command lines; needs --tool-call-parser, which is enough alone")


def tool_call_parser(args) -> str | None:
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (which one reads this model's calls)")
    return args.tool_call_parser


def run(args) -> int:
    import asyncio

    try:
        return asyncio.run(_serve(args))
    except (OSError, ValueError) as e:  # a port in use, a bad address or flag
        sys.stderr.write(f"splitserve openai-server: {e}\n")
        return 1


async def _serve(args) -> int:
    import asyncio
    import signal

    from aiohttp import web

    from splitserve.models.metadata import load_tokenizer
    from splitserve.runtime.client import AsyncClient
    from splitserve.runtime.openai_server import OpenAIServer
    from splitserve.runtime.tls import TLSConfig, check_files, check_listen_address, https_context

    serving_tls = TLSConfig(args.tls_cert, args.tls_key)  # HTTPS; --tls-ca is the router's CA, a client flag
    check_files(serving_tls)
    check_listen_address(args.host, serving_tls, args.allow_insecure)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    options = client_options(args)
    client = AsyncClient(args.address, **options)
    try:
        model = await _wait_for_router(client, args.address, args.wait_s)
        if model is None:
            return 1
        server = OpenAIServer(client, model, api_key=options["api_key"], served_name=args.served_model_name,
                              tokenizer=tokenizer, tool_call_parser=tool_call_parser(args))
        runner = server.runner(args.shutdown_timeout_s)
        await runner.setup()
        sock = _listen(args.host, args.port)
        await web.SockSite(runner, sock, ssl_context=https_context(serving_tls)).start()
        host, port = sock.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if serving_tls.enabled else "http"
        print(f"splitserve openai-server on {scheme}://{host}:{port}/v1 (model {server.name}, router {args.address})",
              flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()  # stops listening, then lets requests in flight finish
        return 0
    finally:
        await client.close()


def _listen(host: str, port: int):
    """A listening socket on host:port; an IPv6 host ("::", "[::1]") too ("::" takes IPv4 as well)."""
    import socket

    host = host.strip("[]")
    if ":" not in host:
        return socket.create_server((host, port))
    return socket.create_server((host, port), family=socket.AF_INET6,
                                dualstack_ipv6=host == "::" and socket.has_dualstack_ipv6())


async def _wait_for_router(client, address: str, wait_s: float):
    """The router's ModelInfo once it answers; None (said on stderr) if it does not in time, or refuses."""
    import asyncio
    import time

    import grpc

    from splitserve.runtime.client_types import SplitserveError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await client.model_info(timeout=max(1.0, min(10.0, deadline - time.monotonic())))
        except SplitserveError as e:
            waiting = e.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            if not waiting or time.monotonic() >= deadline:
                sys.stderr.write(f"splitserve openai-server: the router at {address} did not answer: {e}\n")
                return None
            await asyncio.sleep(0.5)
