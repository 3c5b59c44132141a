"""A decode worker in this process for the KV transfer tests: a DecodeService on the demo model
behind a real gRPC server on loopback, its engine stepping in a thread, and optionally its KV
data socket (a launched stack would spend these tests' time in process start-up)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading

import grpc

from splitserve.models.loader import load_model
from splitserve.models.sharding import MeshConfig, make_mesh
from splitserve.protos import internal_pb2_grpc
from splitserve.runtime.decode_engine import DecodeEngine
from splitserve.runtime.decode_service import DecodeService, add_decode_service, transfer_kv_callable
from splitserve.runtime.drain import Admission
from splitserve.runtime.grpc_common import make_server
from splitserve.runtime.kv_listener import KVListener, KVListenerConfig
from splitserve.runtime.kv_receive import KVReceiver
from splitserve.runtime.model_runner import ModelRunner, RunnerConfig


@dataclasses.dataclass
class DecodeWorker:
    engine: DecodeEngine
    stub: internal_pb2_grpc.DecodeStub
    transfer: object  # Decode/TransferKV, callable with an iterator of chunks
    listener: KVListener | None
    admission: Admission
    address: str  # the gRPC port's


@contextlib.contextmanager
def decode_worker(cache_dir, name: str, kv_socket: KVListenerConfig | None = None):
    """The demo model with page size 8, 64 pages, batch 8; `kv_socket`: also a KV data socket."""
    os.environ["SPLITSERVE_CACHE"] = str(cache_dir)
    runner = ModelRunner(load_model("demo", make_mesh(MeshConfig(1))),
                         RunnerConfig(page_size=8, num_pages=64, max_batch=8))
    engine = DecodeEngine(runner, max_batch=8)
    thread = threading.Thread(target=engine.run_forever, daemon=True)
    thread.start()
    admission = Admission(None, name)
    admission.open()
    receiver = listener = None
    if kv_socket is not None:
        receiver = KVReceiver(engine)
        listener = KVListener(receiver, kv_socket, admission=admission)
        listener.start()
    server = make_server()
    add_decode_service(server, DecodeService(engine, admission, mesh="tp=1", platform="cpu", receiver=receiver,
                                             kv_data=listener))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield DecodeWorker(engine, internal_pb2_grpc.DecodeStub(channel), transfer_kv_callable(channel), listener,
                           admission, f"127.0.0.1:{port}")
    finally:
        channel.close()
        server.stop(0).wait()
        if listener is not None:
            listener.close(1.0)
        engine.stop()
        thread.join(30)
