"""`splitserve launch | router | prefill-worker | decode-worker | colocated-worker`.

Secrets come from a file flag or the environment, never a flag value: argv is visible to
every user of the host (`ps`).
"""

from __future__ import annotations

import argparse
import logging
import os

from splitserve.models.mesh_config import MeshConfig
from splitserve.runtime.admission import DEFAULT_MAX_CONCURRENT_REQUESTS, AdmissionConfig
from splitserve.runtime.auth import API_KEY_ENV, INTERNAL_TOKEN_ENV, read_secret
from splitserve.runtime.cli_args import add_prefill_chunk_flag, add_prefix_cache_flags, port, positive_int, prefix_cache_gib
from splitserve.runtime.cli_openai import add_tool_flags, tool_call_parser
from splitserve.runtime.drain import DEFAULT_DRAIN_TIMEOUT_S, DEFAULT_WORKER_START_TIMEOUT_S
from splitserve.runtime.platform_setup import configure_jax, stop_on_signals
from splitserve.runtime.security import InternalSecurity
from splitserve.runtime.supervisor import DEFAULT_MAX_RESTARTS
from splitserve.runtime.tls import TLSConfig, check_files, check_listen_address

WARMUPS = ("full", "minimal")


def _mesh(text: str) -> MeshConfig:
    try:
        return MeshConfig.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _addresses(text: str) -> list[str]:
    return [a.strip() for a in text.split(",") if a.strip()]


def _add_model_flags(p, host_help: str = "address to listen on", *, runs_model: bool = True) -> None:
    """`runs_model` False (the router): the model's config and tokenizer only; the weights,
    their dtype and the KV pages are the workers' (ModelInfo reports what the workers say)."""
    p.add_argument("--model", default="demo", help="HF directory, Orbax checkpoint, or 'demo' (default)")
    p.add_argument("--host", default="127.0.0.1", help=f"{host_help} (default 127.0.0.1; "
                   "any non-loopback address needs --tls-cert/--tls-key or --allow-insecure)")
    if runs_model:
        p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                       help="serving dtype; auto = the checkpoint's own (float16 checkpoints: bfloat16)")
        p.add_argument("--page-size", type=positive_int, default=16, help="KV cache page size in tokens (default 16)")
        p.add_argument("--warmup", choices=WARMUPS, default="full",
                       help="before serving, compile every bucketed shape (full, default) or only the smallest "
                            "prompt and context lengths (minimal: faster start, longer shapes compile on first use)")
    p.add_argument("--metrics-port", type=port, metavar="PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (https with --tls-cert); "
                        "0 = any free port; default: off. Under launch: the router's port, and every worker "
                        "gets a free port of its own on 127.0.0.1 (all printed at start)")


def _add_admission_flags(p) -> None:
    p.add_argument("--max-concurrent-requests", type=int, default=DEFAULT_MAX_CONCURRENT_REQUESTS,
                   help="Generate calls the router holds at once, queued or streaming; past it a new call gets "
                        f"RESOURCE_EXHAUSTED at once (default {DEFAULT_MAX_CONCURRENT_REQUESTS})")


def _admission(args, command: str) -> AdmissionConfig:
    try:
        return AdmissionConfig(max_concurrent_requests=args.max_concurrent_requests)
    except ValueError as e:
        raise SystemExit(f"splitserve {command}: {e}")


def _add_security_flags(p, *, api_key: bool, internal_token: bool) -> None:
    g = p.add_argument_group("security")
    g.add_argument("--tls-cert", metavar="PEM", help="TLS certificate chain served on this process's port "
                   "(and, with --tls-ca, its client certificate towards workers)")
    g.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    g.add_argument("--tls-ca", metavar="PEM", help="internal CA: mutual TLS between router and workers; workers "
                   "accept only client certificates it signed, callers verify workers with it")
    g.add_argument("--allow-insecure", action="store_true",
                   help="allow a --host other than loopback without TLS (logs a warning)")
    if api_key:
        g.add_argument("--api-key-file", metavar="PATH", help="file holding the API key clients must send as "
                       f"'authorization: Bearer KEY' (default: ${API_KEY_ENV}; neither: no key needed)")
    if internal_token:
        g.add_argument("--internal-token-file", metavar="PATH", help="file holding the token the router and "
                       f"workers share (default: ${INTERNAL_TOKEN_ENV}; neither: workers accept any caller)")


def _tls(args, command: str) -> TLSConfig:
    """The TLS settings, after checking that --host may be listened on with them."""
    try:
        tls = TLSConfig(args.tls_cert, args.tls_key, args.tls_ca)
        check_files(tls)
        check_listen_address(args.host, tls, args.allow_insecure)
    except ValueError as e:
        raise SystemExit(f"splitserve {command}: {e}")
    return tls


def _secret(env_var: str, path: str | None, what: str, command: str) -> str | None:
    try:
        return read_secret(env_var, path, what)
    except ValueError as e:
        raise SystemExit(f"splitserve {command}: {e}")


def _add_worker_start_flag(p) -> None:
    p.add_argument("--worker-start-timeout-s", type=float, default=DEFAULT_WORKER_START_TIMEOUT_S, metavar="S",
                   help="how long the router waits for each worker to report SERVING (loading the weights and "
                        f"compiling) before it gives up (default {DEFAULT_WORKER_START_TIMEOUT_S:.0f})")


def _add_drain_flag(p, what: str) -> None:
    p.add_argument("--drain-timeout-s", type=float, default=DEFAULT_DRAIN_TIMEOUT_S, metavar="S",
                   help=f"on SIGTERM/SIGINT, stop admitting (health NOT_SERVING, new requests get UNAVAILABLE) "
                        f"and wait up to S seconds for {what} before exiting (default {DEFAULT_DRAIN_TIMEOUT_S:.0f})")


def _add_worker_flags(p) -> None:
    _add_model_flags(p)
    p.add_argument("--port", type=port, default=0, help="port to listen on (default: any free port)")
    p.add_argument("--mesh", type=_mesh, default=MeshConfig(), help="this worker's mesh, e.g. tp=2")
    p.add_argument("--platform", choices=["cpu", "gpu", "tpu"], help="JAX platform (default: JAX's choice)")
    p.add_argument("--num-pages", type=positive_int, help="KV pages in the pool (default: as many as --kv-cache-gib holds)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache memory per device (default 1.0)")
    p.add_argument("--max-batch", type=positive_int, default=32, help="requests decoded together at most (default 32)")


KV_TRANSPORT_HELP = ("how decode workers take the KV: 'socket' (default) over a raw TCP data socket (TLS with "
                     "--tls-cert), which each reservation names with a one-time ticket; 'grpc' through "
                     "Decode/TransferKV only (slower; no extra port)")


def _add_kv_transport_flag(p) -> None:
    p.add_argument("--kv-transport", choices=["socket", "grpc"], default="socket", help=KV_TRANSPORT_HELP)


def add_parsers(sub) -> None:
    for role in ("prefill", "decode", "colocated"):
        p = sub.add_parser(f"{role}-worker", help=f"run one {role} worker (for multi-host setups)",
                           description=f"Run one {role} worker process on this host's devices.")
        _add_worker_flags(p)
        if role == "decode":
            _add_kv_transport_flag(p)
            p.add_argument("--kv-data-port", type=port, default=0, metavar="PORT",
                           help="port of the KV data socket on --host (default 0: any free port; each "
                                "reservation tells senders where it is)")
        if role != "decode":
            add_prefix_cache_flags(p, "this worker")
            add_prefill_chunk_flag(p)
        _add_drain_flag(p, "the reservations, prefills and KV transfers it holds")
        _add_security_flags(p, api_key=False, internal_token=True)
        p.set_defaults(run=run_worker, role=role)

    r = sub.add_parser("router", help="run the router in front of running workers",
                       description="Run the public Serving API in front of workers started elsewhere.")
    _add_model_flags(r, runs_model=False)
    r.add_argument("--port", type=port, default=50051, help="public port (default 50051)")
    r.add_argument("--prefill", type=_addresses, default=[], help="prefill worker addresses, comma-separated")
    r.add_argument("--decode", type=_addresses, default=[], help="decode worker addresses, comma-separated")
    r.add_argument("--colocated", type=_addresses, default=[], help="colocated worker addresses, comma-separated")
    _add_admission_flags(r)
    _add_worker_start_flag(r)
    _add_drain_flag(r, "the requests in flight")
    _add_security_flags(r, api_key=True, internal_token=True)
    r.set_defaults(run=run_router)

    lp = sub.add_parser("launch", help="start router + prefill + decode workers on this host",
                        description="Start the whole stack on this host: a router and worker processes, "
                                    "each on its own devices. Prints 'splitserve ready on HOST:PORT'.")
    _add_model_flags(lp, "address the router listens on; workers always listen on 127.0.0.1")
    lp.add_argument("--port", type=port, default=50051, help="router port (default 50051)")
    lp.add_argument("--mode", choices=["disaggregated", "colocated"], default="disaggregated")
    lp.add_argument("--prefill-workers", type=int, help="prefill worker processes (default 1; "
                    "disaggregated mode only)")
    lp.add_argument("--decode-workers", type=int, default=1,
                    help="decode worker processes (default 1); in colocated mode, the worker count")
    lp.add_argument("--prefill-mesh", type=_mesh, help="each prefill worker's mesh (tp=N; default tp=1; "
                    "disaggregated mode only)")
    lp.add_argument("--decode-mesh", type=_mesh, default=MeshConfig(),
                    help="each decode (or colocated) worker's mesh (tp=N)")
    lp.add_argument("--platform", choices=["cpu", "gpu", "tpu"], help="JAX platform of the workers")
    lp.add_argument("--num-pages", type=positive_int, help="KV pages per decode worker (default: from --kv-cache-gib)")
    lp.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache memory per device (default 1.0)")
    lp.add_argument("--max-batch", type=positive_int, default=32, help="decode batch per worker (default 32)")
    _add_kv_transport_flag(lp)
    add_prefix_cache_flags(lp, "each prefill (or colocated) worker")
    add_prefill_chunk_flag(lp)
    _add_admission_flags(lp)
    _add_worker_start_flag(lp)
    _add_drain_flag(lp, "the requests in flight (the router first, then each worker)")
    lp.add_argument("--max-restarts", type=int, default=DEFAULT_MAX_RESTARTS, metavar="N",
                    help="a worker that dies is restarted (same port and flags, backoff 1 s doubling to 30 s); "
                         f"after N restarts in a row launch gives up and exits 1 (default {DEFAULT_MAX_RESTARTS})")
    lp.add_argument("--openai-port", type=port, metavar="PORT",
                    help="also serve the OpenAI-compatible HTTP API (as `splitserve openai-server`) on --host:PORT "
                         "(0: any free port); it prints where it listens")
    lp.add_argument("--served-model-name", help="with --openai-port: the model name of the HTTP API "
                    "(default: the router's)")
    add_tool_flags(lp, "with --openai-port: ")
    _add_security_flags(lp, api_key=True, internal_token=False)  # launch makes a fresh token per run
    lp.set_defaults(run=run_launch)


def _logging() -> None:
    level = os.environ.get("SPLITSERVE_LOG_LEVEL", "INFO")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _internal_security(args, command: str) -> InternalSecurity:
    token = _secret(INTERNAL_TOKEN_ENV, args.internal_token_file, "internal token", command)
    return InternalSecurity(_tls(args, command), token)


def run_worker(args) -> int:
    _logging()
    command = f"{args.role}-worker"
    security = _internal_security(args, command)
    if args.role == "decode" and args.kv_transport == "grpc" and args.kv_data_port:
        raise SystemExit("splitserve decode-worker: --kv-data-port is the port of the KV data socket, which "
                         "--kv-transport grpc does not open; leave one of them out")
    configure_jax(args.platform, cpu_devices=args.mesh.tp)
    from splitserve.runtime.worker import Worker, WorkerConfig, serve_forever

    if args.role == "decode":
        role_options = dict(kv_transport=args.kv_transport, kv_data_port=args.kv_data_port)
    else:
        role_options = dict(prefix_cache_gib=prefix_cache_gib(args, command),
                            prefill_chunk_tokens=args.prefill_chunk_tokens)
    config = WorkerConfig(role=args.role, model=args.model, host=args.host, port=args.port, mesh=args.mesh,
                          dtype=args.dtype, page_size=args.page_size, num_pages=args.num_pages,
                          kv_cache_gib=args.kv_cache_gib, max_batch=args.max_batch, security=security,
                          warmup=args.warmup, metrics_port=args.metrics_port, drain_timeout_s=args.drain_timeout_s,
                          **role_options)
    try:
        worker = Worker(config)
    except (OSError, ValueError) as e:  # a model it cannot load, a cache it cannot size
        raise SystemExit(f"splitserve {command}: {e}") from None
    serve_forever(worker)
    return 0


def run_router(args) -> int:
    _logging()
    from splitserve.runtime.router_server import RouterServer

    if not args.colocated and not (args.prefill and args.decode):
        raise SystemExit("splitserve router: give --prefill and --decode addresses, or --colocated")
    if not args.worker_start_timeout_s > 0:
        raise SystemExit(f"splitserve router: --worker-start-timeout-s must be > 0, got {args.worker_start_timeout_s}")
    admission = _admission(args, "router")
    security = _internal_security(args, "router")
    api_key = _secret(API_KEY_ENV, args.api_key_file, "API key", "router")
    server = RouterServer(args.model, host=args.host, port=args.port, prefill=args.prefill, decode=args.decode,
                          colocated=args.colocated, security=security, api_key=api_key, admission=admission, metrics_port=args.metrics_port)
    stop = stop_on_signals()
    try:
        server.start(worker_timeout_s=args.worker_start_timeout_s)
    except BaseException:
        server.stop()
        raise
    stop.serving()
    print(f"splitserve ready on {server.address}", flush=True)
    if server.metrics_endpoint is not None:
        print(f"splitserve metrics: router {server.metrics_endpoint.url}", flush=True)
    stop.wait()
    if not server.drain(args.drain_timeout_s):
        logging.getLogger(__name__).warning("drain timeout: %d requests still in flight are cut",
                                            server.admission.in_flight)
    server.stop()
    return 0


def run_launch(args) -> int:
    _logging()
    from splitserve.runtime.launch import run_launch as launch
    from splitserve.runtime.supervisor import WorkerDied

    config = launch_config(args)
    try:
        return launch(config)
    except WorkerDied as e:  # at start-up: the worker printed its own error above
        raise SystemExit(f"splitserve launch: {e}") from None
    except (OSError, ValueError) as e:  # the router's: a model path it cannot read, a port in use
        raise SystemExit(f"splitserve launch: {e}") from None


def launch_config(args):
    """The LaunchConfig of `splitserve launch` flags; SystemExit naming a bad or meaningless one."""
    from splitserve.runtime.launch import LaunchConfig

    tls = _tls(args, "launch")
    api_key = _secret(API_KEY_ENV, args.api_key_file, "API key", "launch")
    admission = _admission(args, "launch")
    if args.mode == "colocated":
        given = [flag for flag, value in (("--prefill-workers", args.prefill_workers),
                                          ("--prefill-mesh", args.prefill_mesh)) if value is not None]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise SystemExit(f"splitserve launch: {' and '.join(given)} {verb} to --mode disaggregated only; in "
                             "colocated mode --decode-workers and --decode-mesh set the workers")
    try:
        config = LaunchConfig(model=args.model, host=args.host, port=args.port, mode=args.mode,
                              prefill_workers=1 if args.prefill_workers is None else args.prefill_workers,
                              decode_workers=args.decode_workers,
                              prefill_mesh=args.prefill_mesh or MeshConfig(), decode_mesh=args.decode_mesh,
                              platform=args.platform,
                              dtype=args.dtype, page_size=args.page_size, num_pages=args.num_pages,
                              kv_cache_gib=args.kv_cache_gib, max_batch=args.max_batch,
                              log_level=os.environ.get("SPLITSERVE_LOG_LEVEL", "INFO"), tls=tls, api_key=api_key,
                              warmup=args.warmup, admission=admission, metrics_port=args.metrics_port,
                              drain_timeout_s=args.drain_timeout_s, max_restarts=args.max_restarts,
                              kv_transport=args.kv_transport, prefix_cache_gib=prefix_cache_gib(args, "launch"),
                              prefill_chunk_tokens=args.prefill_chunk_tokens,
                              worker_start_timeout_s=args.worker_start_timeout_s, openai_port=args.openai_port,
                              served_model_name=args.served_model_name, tool_call_parser=tool_call_parser(args))
    except ValueError as e:
        raise SystemExit(f"splitserve launch: {e}")
    return config
