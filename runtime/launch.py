"""`splitserve launch`: a router plus worker processes on this host.

Each worker is its own process with its own device set: on CPU it gets
--xla_force_host_platform_device_count=tp; on GPU a disjoint CUDA_VISIBLE_DEVICES range
when there are enough GPUs (else they share, each with a fraction of the memory); on TPU
(--platform tpu) chips of its own through libtpu's environment (tpu_chip_env), since a TPU
chip serves one process at a time. The router runs in this process and prints the ready
line once every worker has warmed up.
A worker that dies later is restarted with the same port and flags (runtime/supervisor.py);
one that dies during start-up stops launch.

SIGINT/SIGTERM drain: the router refuses new requests and waits for those in flight (up to
--drain-timeout-s), then each worker gets SIGTERM and drains the same way, then launch exits
0. No worker outlives launch (a parent-death signal covers a launch that is killed).

Only the router listens on --host; the workers listen on 127.0.0.1, since only this host's
router and workers call them. Each run makes a fresh internal token, handed to the workers
in their environment (argv is readable by anyone on the host); the workers reject calls
without it. With TLS the workers get the same certificate and --tls-ca (mutual TLS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import secrets
import socket
import subprocess
import sys

from splitserve.models.mesh_config import MeshConfig
from splitserve.runtime.admission import AdmissionConfig
from splitserve.runtime.auth import API_KEY_ENV, INTERNAL_TOKEN_ENV
from splitserve.runtime.console import print_line
from splitserve.runtime.drain import DEFAULT_DRAIN_TIMEOUT_S, DEFAULT_WORKER_START_TIMEOUT_S
from splitserve.runtime.platform_setup import stop_on_signals
from splitserve.runtime.security import InternalSecurity
from splitserve.runtime.supervisor import DEFAULT_MAX_RESTARTS, Supervisor, WorkerDied
from splitserve.runtime.tls import TLSConfig

log = logging.getLogger(__name__)
WORKER_HOST = "127.0.0.1"


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    model: str = "demo"
    host: str = "127.0.0.1"
    port: int = 50051
    mode: str = "disaggregated"
    prefill_workers: int = 1
    decode_workers: int = 1
    prefill_mesh: MeshConfig = MeshConfig()
    decode_mesh: MeshConfig = MeshConfig()
    platform: str | None = None
    dtype: str = "auto"
    page_size: int = 16
    num_pages: int | None = None
    kv_cache_gib: float = 1.0
    max_batch: int = 32
    warmup: str = "full"  # or "minimal"; see WorkerConfig
    log_level: str = "INFO"  # of the worker processes
    tls: TLSConfig = TLSConfig()
    api_key: str | None = dataclasses.field(default=None, repr=False)  # required by the router when set
    metrics_port: int | None = None  # the router's Prometheus port (0: any); workers then get free ports
    admission: AdmissionConfig = AdmissionConfig()  # the router's limit on concurrent requests
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S  # on SIGTERM: for the router, then for each worker
    max_restarts: int = DEFAULT_MAX_RESTARTS  # of one worker in a row, before launch gives up
    kv_transport: str = "socket"  # of the decode workers: see WorkerConfig.kv_transport
    prefix_cache_gib: float = 0.0  # of the prefill (or colocated) workers: see WorkerConfig.prefix_cache_gib
    prefill_chunk_tokens: int = 0  # of the prefill (or colocated) workers: see WorkerConfig.prefill_chunk_tokens
    worker_start_timeout_s: float = DEFAULT_WORKER_START_TIMEOUT_S  # for each worker to report SERVING
    openai_port: int | None = None  # an OpenAI-compatible HTTP server on host:openai_port (0: any)
    served_model_name: str | None = None  # the model name of that server (default: the router's)
    tool_call_parser: str | None = None  # that server's (runtime/tool_parsers.py): tool_choice "auto" served

    def __post_init__(self):
        if self.mode not in ("disaggregated", "colocated"):
            raise ValueError(f"mode must be disaggregated or colocated, got {self.mode!r}")
        if self.decode_workers < 1 or (self.mode == "disaggregated" and self.prefill_workers < 1):
            raise ValueError("need at least one prefill and one decode worker")
        if self.warmup not in ("full", "minimal"):
            raise ValueError(f"warmup must be 'full' or 'minimal', got {self.warmup!r}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if not self.worker_start_timeout_s > 0:
            raise ValueError(f"worker_start_timeout_s must be > 0, got {self.worker_start_timeout_s}")
        if self.tool_call_parser is not None and self.openai_port is None:
            raise ValueError("--tool-call-parser is for the OpenAI-compatible server: give --openai-port too")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if self.prefill_chunk_tokens < 0:
            raise ValueError(f"prefill_chunk_tokens must be >= 0, got {self.prefill_chunk_tokens}")
        if self.kv_transport not in ("socket", "grpc"):
            raise ValueError(f"kv_transport must be socket or grpc, got {self.kv_transport!r}")
        if self.tls.enabled and not self.tls.mutual:
            raise ValueError(f"TLS needs --tls-ca too: the workers listen on {WORKER_HOST} and the router checks "
                             "them against that CA (so the certificate must also name 127.0.0.1)")


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    role: str
    mesh: MeshConfig
    port: int
    devices: tuple[int, ...]  # accelerator ids for this worker (empty on CPU)
    metrics_port: int | None = None  # its Prometheus port on WORKER_HOST, when metrics are on


# Worker ports are picked here and bound by the worker seconds later (once JAX has loaded). A port
# from the kernel's ephemeral range could meanwhile go to any bind(("", 0)): the router's own
# port 0, a decode worker's KV data socket, a client. So picks come from below that range, which
# port-0 binds never use; the ones already handed out are remembered so none is given twice.
EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
LOWEST_PICKED_PORT = 10000
_handed_out: set[int] = set()


def free_port(host: str, tries: int = 200) -> int:
    """A port on `host` that is free now and outside the ephemeral range where possible."""
    try:
        with open(EPHEMERAL_RANGE_FILE) as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: fall back to the kernel's pick
        ephemeral_low = LOWEST_PICKED_PORT
    for _ in range(tries if ephemeral_low > LOWEST_PICKED_PORT else 0):
        port = random.randrange(LOWEST_PICKED_PORT, ephemeral_low)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:  # in use
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def plan_workers(config: LaunchConfig, num_accelerators: int, devices_per_chip: int = 1) -> list[WorkerSpec]:
    """Device ids per worker: GPU ids, or on TPU chip ids (a tp=N mesh takes N / devices_per_chip chips)."""
    roles = ([("prefill", config.prefill_mesh)] * config.prefill_workers
             + [("decode", config.decode_mesh)] * config.decode_workers)
    if config.mode == "colocated":
        roles = [("colocated", config.decode_mesh)] * config.decode_workers
    if config.platform == "tpu":
        return [WorkerSpec(role, mesh, free_port(WORKER_HOST), chips)
                for (role, mesh), chips in zip(roles, plan_tpu_chips([m for _, m in roles], num_accelerators,
                                                                      devices_per_chip))]
    specs, next_device = [], 0
    for role, mesh in roles:
        devices: tuple[int, ...] = ()
        if num_accelerators:
            if next_device + mesh.tp <= num_accelerators:
                devices = tuple(range(next_device, next_device + mesh.tp))
                next_device += mesh.tp
            else:  # not enough for disjoint sets: share from device 0
                devices = tuple(range(mesh.tp))
        metrics_port = None if config.metrics_port is None else free_port(WORKER_HOST)
        specs.append(WorkerSpec(role, mesh, free_port(WORKER_HOST), devices, metrics_port))
    return specs


# TPU_CHIPS_PER_PROCESS_BOUNDS for a process that owns N chips of a host: the box its chips form.
# The values JAX's own multi-process test launcher uses on 4- and 8-chip hosts
# (jax/_src/test_multiprocess.py); other counts have no known box, so they are refused.
TPU_CHIP_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1", 8: "2,4,1"}


def plan_tpu_chips(meshes: list[MeshConfig], num_chips: int, devices_per_chip: int = 1) -> list[tuple[int, ...]]:
    """Disjoint chip ids per worker. A chip serves one process, so unlike GPUs they are never shared.

    Each worker's chips start at a multiple of its chip count (2 chips: 0-1 or 2-3; 4 chips: 0-3
    or 4-7), so that they form one of the boxes of TPU_CHIP_BOUNDS.
    """
    plans, used = [], set()
    for mesh in meshes:
        if mesh.tp % devices_per_chip:
            raise ValueError(f"tp={mesh.tp} is not a whole number of TPU chips ({devices_per_chip} devices each)")
        count = mesh.tp // devices_per_chip
        if count not in TPU_CHIP_BOUNDS:
            raise ValueError(f"a TPU worker takes 1, 2, 4 or 8 chips, not {count} (tp={mesh.tp})")
        start = next((s for s in range(0, num_chips - count + 1, count) if used.isdisjoint(range(s, s + count))), None)
        if start is None:
            needed = sum(m.tp for m in meshes) // devices_per_chip
            raise ValueError(f"the workers need {needed} TPU chips of their own (tp {[m.tp for m in meshes]}) "
                             f"but this host has {num_chips}")
        used.update(range(start, start + count))
        plans.append(tuple(range(start, start + count)))
    return plans


def tpu_chip_env(chips: tuple[int, ...], libtpu_port: int) -> dict[str, str]:
    """libtpu settings that make `chips` of this host a one-process TPU slice of their own.

    As vLLM's TPU backend does for one engine per chip group: the chips and their box, one
    process in the slice, and a libtpu port of its own (two runtimes on the default 8476 clash).
    ALLOW_MULTIPLE_LIBTPU_LOAD lets a second process load libtpu beside the first.
    """
    return {"TPU_VISIBLE_CHIPS": ",".join(map(str, chips)),
            "TPU_CHIPS_PER_PROCESS_BOUNDS": TPU_CHIP_BOUNDS[len(chips)],
            "TPU_PROCESS_BOUNDS": "1,1,1",
            "TPU_PROCESS_PORT": str(libtpu_port),
            "TPU_PROCESS_ADDRESSES": f"localhost:{libtpu_port}",
            "CLOUD_TPU_TASK_ID": "0",
            "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def worker_command(config: LaunchConfig, spec: WorkerSpec) -> list[str]:
    role_command = {"prefill": "prefill-worker", "decode": "decode-worker", "colocated": "colocated-worker"}
    cmd = [sys.executable, "-m", "splitserve.runtime.cli", role_command[spec.role],
           "--model", config.model, "--host", WORKER_HOST, "--port", str(spec.port),
           "--mesh", f"tp={spec.mesh.tp}", "--dtype", config.dtype, "--page-size", str(config.page_size),
           "--kv-cache-gib", str(config.kv_cache_gib), "--max-batch", str(config.max_batch),
           "--warmup", config.warmup, "--drain-timeout-s", str(config.drain_timeout_s)]
    if config.num_pages is not None:
        cmd += ["--num-pages", str(config.num_pages)]
    if spec.role == "decode":  # its KV data socket takes any free port (each reservation names it)
        cmd += ["--kv-transport", config.kv_transport]
    else:
        if config.prefix_cache_gib:
            cmd += ["--prefix-cache-gib", str(config.prefix_cache_gib)]
        if config.prefill_chunk_tokens:
            cmd += ["--prefill-chunk-tokens", str(config.prefill_chunk_tokens)]
    if spec.metrics_port is not None:
        cmd += ["--metrics-port", str(spec.metrics_port)]
    if config.platform:
        cmd += ["--platform", config.platform]
    if config.tls.enabled:  # paths only: the key itself stays in its file
        cmd += ["--tls-cert", config.tls.cert, "--tls-key", config.tls.key, "--tls-ca", config.tls.ca]
    return cmd


def worker_env(config: LaunchConfig, spec: WorkerSpec, shared_gpus: bool, num_workers: int,
               internal_token: str) -> dict[str, str]:
    env = dict(os.environ, SPLITSERVE_LOG_LEVEL=config.log_level)
    env.pop(API_KEY_ENV, None)  # workers never need the public key
    env[INTERNAL_TOKEN_ENV] = internal_token
    if spec.devices and config.platform in (None, "gpu"):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, spec.devices))
        if shared_gpus:
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / num_workers:.2f}"
    if spec.devices and config.platform == "tpu":
        env.update(tpu_chip_env(spec.devices, free_port(WORKER_HOST)))
    return env


class Launcher:
    def __init__(self, config: LaunchConfig):
        self.config = config
        self.supervisor = Supervisor(config.max_restarts)
        self.specs: list[WorkerSpec] = []
        self.security = InternalSecurity(config.tls, secrets.token_urlsafe(32))  # a fresh token per run

    def start_workers(self) -> list[WorkerSpec]:
        num_accelerators, devices_per_chip = 0, 1
        if self.config.platform in (None, "gpu"):
            num_accelerators = _count_gpus()
        elif self.config.platform == "tpu":
            num_accelerators, devices_per_chip = count_tpu_chips()
        specs = plan_workers(self.config, num_accelerators, devices_per_chip)
        needed = sum(s.mesh.tp for s in specs)
        shared = self.config.platform != "tpu" and bool(num_accelerators) and needed > num_accelerators
        for spec in specs:
            self.supervisor.start(f"{spec.role}-worker --port {spec.port}", worker_command(self.config, spec),
                                  worker_env(self.config, spec, shared, len(specs), self.security.token))
        self.specs = specs
        return specs

    def check_alive(self) -> None:
        """Raises WorkerDied if a worker process has exited (during start-up)."""
        self.supervisor.check_alive()

    def supervise(self) -> None:
        """Restarts workers that died; raises WorkerDied once one has died too often."""
        self.supervisor.supervise()

    def stop(self) -> None:
        """Each worker drains (up to drain_timeout_s) and exits; a few seconds more, then SIGKILL."""
        self.supervisor.stop(self.config.drain_timeout_s + 10.0)


def _count_gpus() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines())


def count_tpu_chips() -> tuple[int, int]:
    """(TPU chips on this host's PCI bus, JAX devices per chip), without starting a TPU runtime.

    Uses JAX's own PCI scan (jax._src.hardware_utils: private, hence the guard). TPU v2 and v3
    chips hold two TensorCores that JAX shows as two devices; later chips show one.
    """
    try:
        from jax._src import hardware_utils
    except ImportError:
        return 0, 1
    chips, version = hardware_utils.num_available_tpu_chips_and_device_id()
    two_cores = version is not None and version.name in ("v2", "v3")
    return chips, 2 if two_cores else 1


@contextlib.contextmanager
def running_stack(config: LaunchConfig):
    """Starts workers and the router; yields (router_server, launcher); stops everything on exit."""
    from splitserve.runtime.router_server import RouterServer

    launcher = Launcher(config)
    router = None
    try:
        specs = launcher.start_workers()
        addresses = {role: [f"{WORKER_HOST}:{s.port}" for s in specs if s.role == role]
                     for role in ("prefill", "decode", "colocated")}
        router = RouterServer(config.model, host=config.host, port=config.port, prefill=addresses["prefill"],
                              decode=addresses["decode"], colocated=addresses["colocated"],
                              security=launcher.security,
                              api_key=config.api_key, admission=config.admission, metrics_port=config.metrics_port)
        router.start(config.worker_start_timeout_s, check_alive=launcher.check_alive)
        yield router, launcher
    finally:
        if router is not None:
            router.stop()
        launcher.stop()


@contextlib.contextmanager
def _openai_server(config: LaunchConfig, router_address: str):
    """With --openai-port: the OpenAI-compatible server's process, started and listening; else None."""
    if config.openai_port is None:
        yield None
        return
    from splitserve.models.metadata import resolve_model_dir
    from splitserve.runtime.openai_process import OpenAIServerProcess

    has_tokenizer = (resolve_model_dir(config.model) / "tokenizer.json").exists()  # else logprobs say token_id:N
    server = OpenAIServerProcess(router_address, config.host, config.openai_port, config.api_key,
                                 config.served_model_name, tokenizer=config.model if has_tokenizer else None,
                                 shutdown_timeout_s=config.drain_timeout_s, tls=config.tls,
                                 tool_call_parser=config.tool_call_parser)
    try:
        server.start()
        try:
            server.wait_ready()
        except RuntimeError as e:
            raise SystemExit(f"splitserve launch: {e}") from None
        yield server
    finally:
        server.stop(config.drain_timeout_s + 10)


def run_launch(config: LaunchConfig) -> int:
    stop = stop_on_signals()
    with running_stack(config) as (router, launcher), _openai_server(config, router.address) as openai:
        def kill_all() -> None:  # a second signal: nothing drains on alone
            launcher.supervisor.kill_all()
            if openai is not None:
                openai.kill()

        stop.before_exit = kill_all
        stop.serving()
        print_line(f"splitserve ready on {router.address}")
        if router.metrics_endpoint is not None:
            scheme = router.metrics_endpoint.url.split(":", 1)[0]
            workers = ", ".join(f"{s.role} {WORKER_HOST}:{s.port} {scheme}://{WORKER_HOST}:{s.metrics_port}/metrics"
                                for s in launcher.specs)
            print_line(f"splitserve metrics: router {router.metrics_endpoint.url}; {workers}")
        while not stop.wait(0.5):
            try:
                launcher.supervise()
            except WorkerDied as e:
                log.error("%s", e)
                return 1
            if openai is not None and (status := openai.exited()) is not None:
                log.error("the OpenAI server exited with status %d", status)
                return 1
        if openai is not None:
            openai.terminate()  # it takes no new HTTP requests and finishes those in flight meanwhile
        log.warning("draining: the router takes no new requests; waiting up to %.0fs for those in flight",
                    config.drain_timeout_s)
        if not router.drain(config.drain_timeout_s):
            log.warning("drain timeout: %d requests still in flight are cut", router.lifecycle.in_flight)
        # running_stack's exit stops the router, then SIGTERMs the workers, which drain in turn.
    return 0
