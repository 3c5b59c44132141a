"""The router process: public Serving API + health + reflection in front of the workers."""

from __future__ import annotations

import threading

from grpc_reflection.v1alpha import reflection

from splitserve.models.metadata import load_metadata
from splitserve.protos import serving_pb2
from splitserve.runtime.admission import AdmissionConfig, AdmissionGate
from splitserve.runtime.auth import require_api_key
from splitserve.runtime.drain import DEFAULT_DRAIN_TIMEOUT_S, DEFAULT_WORKER_START_TIMEOUT_S, Admission
from splitserve.runtime import grpc_common
from splitserve.runtime.grpc_common import PUBLIC_OPTIONS, add_health, listen, make_server, wait_until_serving
from splitserve.runtime.metrics import MetricsEndpoint, RouterMetrics
from splitserve.runtime.router import Router
from splitserve.runtime.security import InternalSecurity
from splitserve.runtime.serving_service import ServingService, add_serving_service
from splitserve.runtime.tls import server_credentials


SPARE_HANDLER_THREADS = 64  # beyond the admitted streams: health checks, ModelInfo, calls being refused


class RouterServer:
    """`security`: TLS (its certificate also serves the public port) and the token for the workers;
    `api_key`: required on every public method but health and reflection (None: no key);
    `admission`: how many Generate calls it holds at once;
    `metrics_port`: serve Prometheus metrics at http(s)://host:port/metrics (None: off; 0: any port)."""

    def __init__(self, model: str, *, host: str, port: int, prefill: list[str], decode: list[str],
                 colocated: list[str],
                 security: InternalSecurity = InternalSecurity(), api_key: str | None = None,
                 admission: AdmissionConfig = AdmissionConfig(), metrics_port: int | None = None):
        metadata = load_metadata(model)
        self.router = Router(metadata, prefill=prefill, decode=decode, colocated=colocated,
                             channels=security.channels())
        # A Generate stream holds a handler thread for its whole life. With fewer threads than the
        # admission limit, calls past them would queue unseen by the gate (not refused at once), and
        # health checks and ModelInfo behind them. Threads start only as calls need them.
        self.handler_threads = admission.max_concurrent_requests + SPARE_HANDLER_THREADS
        self.server = make_server(PUBLIC_OPTIONS, interceptors=[require_api_key(api_key)] if api_key else [],
                                  max_workers=self.handler_threads, keepalive=grpc_common.PUBLIC_KEEPALIVE)
        self.health = add_health(self.server)
        self.lifecycle = Admission(self.health, "router")
        self._able_lock = threading.Lock()
        self.router.health.on_change = self._follow_workers
        self.admission = AdmissionGate(admission)
        self.metrics = RouterMetrics()
        self.metrics.follow_page_line(lambda: self.router.pages.waiting)
        add_serving_service(self.server, ServingService(
            self.router, lifecycle=self.lifecycle, admission=self.admission, metrics=self.metrics))
        service_names = (serving_pb2.DESCRIPTOR.services_by_name["Serving"].full_name,
                         "grpc.health.v1.Health", reflection.SERVICE_NAME)
        reflection.enable_server_reflection(service_names, self.server)
        self.port = listen(self.server, host, port, server_credentials(security.tls, require_client_cert=False))
        self.address = f"{host}:{self.port}"
        self.metrics_endpoint = (None if metrics_port is None
                                 else MetricsEndpoint(self.metrics.registry, host, metrics_port, security.tls))

    def start(self, worker_timeout_s: float = DEFAULT_WORKER_START_TIMEOUT_S, check_alive=None) -> None:
        """Serves once every worker reports SERVING; `check_alive()` may raise to give up early."""
        self.server.start()
        for worker in self.router.workers:
            wait_until_serving(worker.address, worker_timeout_s, check_alive, channels=self.router.channels)
        self.router.refresh_stats()
        self.router.health.start()
        self.lifecycle.open()

    def _follow_workers(self) -> None:
        """Health NOT_SERVING while no request could be served (every prefill or every decode
        worker down), so that a load balancer takes clients elsewhere; SERVING once one is back.
        Under a lock, each call reads the state afresh, so the last change is the one published."""
        with self._able_lock:
            self.lifecycle.set_able(self.router.can_serve())

    def drain(self, timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S) -> bool:
        """Refuses new Generate calls (UNAVAILABLE, "draining"); waits for those in flight.

        False if some were still running after `timeout_s` (stop() then cuts them)."""
        return self.lifecycle.drain(timeout_s)

    def stop(self, grace_s: float = 5.0) -> None:
        self.lifecycle.start_draining()
        self.server.stop(grace_s).wait()
        self.router.health.stop()
        self.router.close()
        self.router.channels.close()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()

