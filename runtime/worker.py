"""A worker process: one mesh, one role (prefill, decode, or colocated = both).

Start-up order: load the model onto this process's mesh → build the runner and engines →
listen (health NOT_SERVING, new work refused as "starting") → warm up (compile the common
shapes) → health SERVING → print the ready line.

On SIGTERM/SIGINT it drains (runtime/drain.py): health NOT_SERVING, new reservations and
prefills refused with UNAVAILABLE, held reservations decoded to their end and queued prefills
and KV transfers finished, for at most `drain_timeout_s`; then the KV data listener and the
server stop and the process exits 0.

A decode worker with `kv_transport="socket"` (the default) also listens on a KV data socket
(runtime/kv_listener.py, port `kv_data_port`, any free one by default) and hands its address
and a one-time ticket out with each reservation; senders then move the KV there instead of
through gRPC TransferKV, which stays open either way.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import threading
import time

import numpy as np

from splitserve.models.mesh_config import MeshConfig
from splitserve.protos import internal_pb2_grpc
from splitserve.runtime.decode_engine import DecodeEngine
from splitserve.runtime.decode_service import DecodeService, add_decode_service
from splitserve.runtime.device_turns import DeviceTurns
from splitserve.runtime.drain import DEFAULT_DRAIN_TIMEOUT_S, Admission
from splitserve.runtime.grpc_common import ChannelPool, add_health, make_server
from splitserve.runtime.kv_listener import KVListener, KVListenerConfig
from splitserve.runtime.kv_receive import KVReceiver
from splitserve.runtime.metrics import MetricsEndpoint, WorkerMetrics
from splitserve.runtime.host_kv import PrefilledRow
from splitserve.runtime.model_runner import ModelRunner, RunnerConfig
from splitserve.runtime.prefill_engine import PrefillEngine, PrefillJob
from splitserve.runtime.prefill_service import KVSender, PrefillService
from splitserve.runtime.platform_setup import stop_on_signals
from splitserve.runtime.security import InternalSecurity

log = logging.getLogger(__name__)
ROLES = ("prefill", "decode", "colocated")
KV_TRANSPORTS = ("socket", "grpc")
# A request's KV smaller than this leaves after its first token rather than layer by layer
# during the prefill: on a CPU host the early start costs the prefill more than it saves
# (scripts/bench/RESULTS.md, TTFT), and a transfer this small takes about a millisecond.
STREAM_DURING_PREFILL_MIN_BYTES = 8 << 20
GIL_SWITCH_INTERVAL_S = 0.0005


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    role: str
    model: str = "demo"
    host: str = "127.0.0.1"
    port: int = 0
    mesh: MeshConfig = MeshConfig()
    dtype: str = "auto"
    page_size: int = 16
    num_pages: int | None = None  # None: as many as kv_cache_gib allows
    kv_cache_gib: float = 1.0  # KV cache memory per device
    max_batch: int = 32
    max_prefill_batch: int = 8
    attention_impl: str = "auto"
    warmup: str = "full"  # compile every bucketed shape before serving; "minimal": smallest lengths only
    security: InternalSecurity = InternalSecurity()  # TLS of its port and of its KV channels; the token
    metrics_port: int | None = None  # Prometheus metrics at http(s)://host:port/metrics; None: off, 0: any port
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S  # on SIGTERM, how long held work may take to finish
    # How a decode worker takes KV: "socket" opens the KV data listener (gRPC TransferKV stays
    # open too); "grpc" takes it through TransferKV only. Colocated workers keep KV in-process.
    kv_transport: str = "socket"
    kv_data_port: int = 0  # the KV data listener's port on `host`; 0: any free port
    # Prefix caching on a prefill or colocated worker: memory per device for the KV of recent prompts'
    # whole blocks (runtime/prefix_index.py); 0: off.
    prefix_cache_gib: float = 0.0
    # Chunked prefill on a prefill or colocated worker: prompts longer than this are prefilled in
    # chunks of it, other work running in between (runtime/chunked_prefill.py); 0: off.
    prefill_chunk_tokens: int = 0

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.kv_transport not in KV_TRANSPORTS:
            raise ValueError(f"kv_transport must be one of {KV_TRANSPORTS}, got {self.kv_transport!r}")
        if self.warmup not in ("full", "minimal"):
            raise ValueError(f"warmup must be 'full' or 'minimal', got {self.warmup!r}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if not (math.isfinite(self.prefix_cache_gib) and self.prefix_cache_gib >= 0):
            raise ValueError(f"prefix_cache_gib must be a number >= 0, got {self.prefix_cache_gib}")
        if self.prefix_cache_gib and self.role == "decode":
            raise ValueError("prefix caching saves prefill work: it applies to prefill and colocated workers, "
                             "not a decode worker")
        if self.prefill_chunk_tokens < 0:
            raise ValueError(f"prefill_chunk_tokens must be >= 0, got {self.prefill_chunk_tokens}")
        if self.prefill_chunk_tokens and self.role == "decode":
            raise ValueError("chunked prefill applies to prefill and colocated workers, not a decode worker")


class Worker:
    def __init__(self, config: WorkerConfig):
        import jax

        from splitserve.runtime.in_process import load_for_serving

        self.config = config
        model = load_for_serving(config.model, config.mesh, config.dtype)
        platform = jax.default_backend()
        mesh = f"tp={config.mesh.tp}"
        serves_with = dict(dtype=np.dtype(model.dtype).name)  # what Stats tells the router
        has_decode = config.role in ("decode", "colocated")
        self.runner = ModelRunner(model, RunnerConfig(
            page_size=config.page_size, num_pages=self._num_pages(model) if has_decode else 2,
            max_batch=config.max_batch, max_prefill_batch=config.max_prefill_batch,
            attention_impl=config.attention_impl, decodes=has_decode,
            prefix_cache_pages=self._prefix_cache_pages(model), prefill_chunk_tokens=config.prefill_chunk_tokens,
        ))
        self.server = make_server(interceptors=config.security.worker_interceptors())
        self.health = add_health(self.server)
        self.port = config.security.listen(self.server, config.host, config.port)
        self.address = f"{config.host}:{self.port}"
        self.admission = Admission(self.health, f"{config.role} worker {self.address}")
        self.channels: ChannelPool = config.security.channels()  # TLS and the token on every KV transfer
        self.threads: list[threading.Thread] = []
        self.decode_engine = self.prefill_engine = None
        self.decode_service: DecodeService | None = None
        self.metrics = WorkerMetrics()
        self.kv_listener: KVListener | None = None
        # Colocated on a CPU, the two engines take turns on the cores (runtime/device_turns.py).
        turns = DeviceTurns() if config.role == "colocated" and platform == "cpu" else None
        if has_decode:
            self.decode_engine = DecodeEngine(self.runner, max_batch=config.max_batch, turns=turns)
            self.metrics.watch_decode(self.decode_engine.stats)
            receiver = KVReceiver(self.decode_engine)
            if config.role == "decode" and config.kv_transport == "socket":
                self.kv_listener = KVListener(receiver, KVListenerConfig(host=config.host, port=config.kv_data_port),
                                              ssl_context=config.security.kv_data_server_context(),
                                              admission=self.admission, metrics=self.metrics)
            self.decode_service = DecodeService(self.decode_engine, self.admission, mesh=mesh, platform=platform,
                                                role=config.role, metrics=self.metrics, receiver=receiver,
                                                kv_data=self.kv_listener, page_size=config.page_size,
                                                **serves_with)
            add_decode_service(self.server, self.decode_service)
            self.threads.append(threading.Thread(target=self.decode_engine.run_forever, name="decode", daemon=True))
        if config.role in ("prefill", "colocated"):
            self.prefill_engine = PrefillEngine(self.runner, self._send_kv, max_prefill_batch=config.max_prefill_batch,
                                                metrics=self.metrics, turns=turns)
            self.metrics.watch_prefill(lambda: self.prefill_engine.in_flight)
            if self.runner.prefix_cache is not None:
                self.metrics.watch_prefix_cache(self.runner.prefix_cache)
            internal_pb2_grpc.add_PrefillServicer_to_server(
                PrefillService(self.prefill_engine, self.admission, mesh=mesh, platform=platform, role=config.role,
                               page_size=config.page_size if has_decode else 0,
                               # the router routes by it among prefill workers; a colocated worker prefills
                               # where its pages are reserved, so it reports none
                               prefix_cache_block=(config.page_size if self.runner.prefix_cache is not None
                                                   and config.role == "prefill" else 0),
                               **serves_with),
                self.server)
            self.threads.append(threading.Thread(target=self.prefill_engine.run_forever, name="prefill", daemon=True))
        self._sender = KVSender(self.channels, metrics=self.metrics,
                                ssl_context=config.security.kv_data_client_context())
        self.metrics_endpoint = None
        cfg = model.config  # bytes of the model's own KV heads, as sent
        self._kv_bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * np.dtype(model.dtype).itemsize

    def _prefix_cache_pages(self, model) -> int:
        return prefix_cache_pages(self.config.prefix_cache_gib, model, self.config.page_size, self.config.mesh.tp)

    def _num_pages(self, model) -> int:
        if self.config.num_pages is not None:
            return self.config.num_pages
        per_page = page_bytes(model, self.config.page_size, self.config.mesh.tp)
        pages = int(self.config.kv_cache_gib * (1 << 30)) // per_page
        if pages < 2:
            raise ValueError(f"--kv-cache-gib {self.config.kv_cache_gib} holds {pages} pages of {per_page} bytes; "
                             "need at least 2")
        log.info("KV cache: %d pages of %d tokens (%.2f GiB per device)", pages, self.config.page_size,
                 pages * per_page / (1 << 30))
        return pages

    def _send_kv(self, job: PrefillJob, kv: PrefilledRow) -> None:
        if self.decode_engine is not None and job.decode_address == self.address:
            # Colocated: same mesh and page pool; the KV never leaves the device.
            self.decode_engine.kv_arrived(job.request_id, kv, kv.length, job.first_token.result())
        else:  # layer by layer, each as soon as the prefill has computed it
            k_layers, v_layers = kv.host_layers(self.runner.model.layout.kv_source)
            if kv.length * self._kv_bytes_per_token < STREAM_DURING_PREFILL_MIN_BYTES:
                job.first_token.result()  # small KV: sending it takes less than it would disturb the prefill
            self._sender(job, job.first_token.result, k_layers, v_layers)

    def warm_up(self) -> None:
        """Compiles the bucketed shapes before the worker reports SERVING."""
        start = time.perf_counter()
        shapes = self.runner.warm_up(decode=self.decode_engine is not None, full=self.config.warmup == "full")
        log.info("warm-up (%s): %d programs compiled in %.1fs", self.config.warmup, shapes,
                 time.perf_counter() - start)

    def start(self) -> None:
        self.server.start()  # health answers NOT_SERVING during the warm-up, rather than nothing
        self.warm_up()
        for thread in self.threads:
            thread.start()
        if self.kv_listener is not None:
            self.kv_listener.start()
            log.info("KV data socket on %s", self.kv_listener.address)
        if self.config.metrics_port is not None:
            self.metrics_endpoint = MetricsEndpoint(self.metrics.registry, self.config.host, self.config.metrics_port,
                                                    self.config.security.tls)
            log.info("metrics on %s", self.metrics_endpoint.url)
        self.admission.open()

    def idle(self) -> bool:
        return all(engine is None or engine.idle for engine in (self.decode_engine, self.prefill_engine))

    def drain(self) -> bool:
        """Refuses new work; waits up to drain_timeout_s for held work. False if some was left."""
        log.warning("%s worker %s draining (up to %.0fs)", self.config.role, self.address, self.config.drain_timeout_s)
        done = self.admission.drain(self.config.drain_timeout_s, idle=self.idle)
        if not done:
            log.warning("drain timeout: %s", self.decode_engine.stats() if self.decode_engine else "prefills left")
        return done

    def stop(self, grace_s: float = 5.0) -> None:
        self.admission.start_draining()
        if self.kv_listener is not None:  # after the drain: no held reservation waits for its KV any more
            self.kv_listener.close(grace_s)
        if self.decode_service is not None:
            self.decode_service.stop_batched_calls(grace_s)
        self.server.stop(grace_s).wait()
        for engine in (self.decode_engine, self.prefill_engine):
            if engine is not None:
                engine.stop()
        for thread in self.threads:  # let them leave their loops before the interpreter exits
            thread.join(timeout=grace_s)
        self.channels.close()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()


def pages_bytes_per_device(num_layers: int, kv_heads: int, page_size: int, head_dim: int, itemsize: int,
                           tp: int) -> int:
    """Bytes one page (K and V, every layer) takes on each device: KV heads are sharded over tp."""
    return 2 * num_layers * (kv_heads // tp) * page_size * head_dim * itemsize


def prefix_cache_pages(gib: float, model, page_size: int, tp: int) -> int:
    """Pages of a prefix cache of `gib` per device (0: off), its sink page included."""
    if not gib:
        return 0
    per_page = page_bytes(model, page_size, tp)
    pages = int(gib * (1 << 30)) // per_page
    if pages < 2:  # one is the sink
        raise ValueError(f"--prefix-cache-gib {gib} holds {max(pages - 1, 0)} blocks of {per_page} bytes "
                         f"({page_size} tokens each); give at least {2 * per_page / (1 << 30):.6f}")
    log.info("prefix cache: %d blocks of %d tokens (%.3f GiB per device)", pages - 1, page_size,
             pages * per_page / (1 << 30))
    return pages


def page_bytes(model, page_size: int, tp: int) -> int:
    """Bytes one page of `model`'s KV takes on each device."""
    import jax.numpy as jnp

    return pages_bytes_per_device(model.config.num_layers, model.layout.num_kv_heads, page_size,
                                  model.config.head_dim, jnp.dtype(model.dtype).itemsize, tp)


# A signal during warm-up ends the worker at once (StopRequested); this much later at the latest.
STOP_WHILE_STARTING_S = 5.0


def serve_forever(worker: Worker) -> None:
    """Runs until SIGTERM or SIGINT, then stops cleanly."""
    stop = stop_on_signals(exit_after_s=STOP_WHILE_STARTING_S)
    # Threads that wake together (a first token's reply and its KV sender) would otherwise wait
    # up to Python's 5 ms GIL switch interval for each other: that showed up in TTFT.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    try:
        worker.start()
    except OSError as e:  # its port is taken
        raise SystemExit(f"splitserve {worker.config.role}-worker: {e}") from None
    stop.serving()
    log.warning("splitserve %s worker ready on %s", worker.config.role, worker.address)
    stop.wait()
    worker.drain()
    worker.stop()
