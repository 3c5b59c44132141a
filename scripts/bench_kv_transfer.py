"""KV handoff speed: the serving paths against a raw TCP socket and a bare gRPC stream, in one run.

    python scripts/bench_kv_transfer.py --kv-mib 512 [--chunk-kib 1024] [--json]

Starts a real decode worker process (`splitserve decode-worker`, the serving code, with its
KV data socket) and sends it KV through `KVSender` (the code the prefill worker uses): header,
~1 MiB chunks, checksummed trailer; the worker assembles, verifies and accepts it into a
reservation. The KV is split into requests of at most the model's context. Each request is
reserved with Decode/Reserve and sent twice over, once per transport:
- socket: over the worker's KV data socket, with the address and ticket from Reserve (the default);
- gRPC: through Decode/TransferKV (what senders do when Reserve names no data socket).
Then the same number of bytes goes through a plain TCP socket to a child process (1 MiB
writes): the ceiling of a host-staged handoff; and through a bare gRPC stream to a server that
only counts them: the ceiling of any gRPC handoff in Python. Prints all four with their ratios
to TCP, and the decode worker's peak RSS growth during the socket handoff. With --json the last
line is {"kv_bytes", "transfer_s", "gbytes_per_s", "tcp_gbytes_per_s", ...} where transfer_s and
gbytes_per_s are the socket path's (the serving default) and grpc_* the TransferKV path's.

The model is a tiny synthetic Llama whose KV is large per token (many layers and KV
heads), written with safetensors into a temp dir, so no download is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LAYERS, KV_HEADS, HEAD_DIM, CONTEXT = 16, 8, 128, 2048  # 128 KiB of f32 KV per token


def write_model(directory: Path) -> None:
    """A float32 Llama with 16 layers, 8 KV heads of 128: small weights, big KV."""
    import safetensors.numpy

    hidden, heads, vocab, inter = 64, 8, 64, 64
    rng = np.random.default_rng(0)
    tensors = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden)), "model.norm.weight": np.ones(hidden),
               "lm_head.weight": rng.standard_normal((vocab, hidden)) * 0.02}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensors |= {p + "input_layernorm.weight": np.ones(hidden), p + "post_attention_layernorm.weight": np.ones(hidden),
                    p + "self_attn.q_proj.weight": rng.standard_normal((heads * HEAD_DIM, hidden)) * 0.02,
                    p + "self_attn.k_proj.weight": rng.standard_normal((KV_HEADS * HEAD_DIM, hidden)) * 0.02,
                    p + "self_attn.v_proj.weight": rng.standard_normal((KV_HEADS * HEAD_DIM, hidden)) * 0.02,
                    p + "self_attn.o_proj.weight": rng.standard_normal((hidden, heads * HEAD_DIM)) * 0.02,
                    p + "mlp.gate_proj.weight": rng.standard_normal((inter, hidden)) * 0.02,
                    p + "mlp.up_proj.weight": rng.standard_normal((inter, hidden)) * 0.02,
                    p + "mlp.down_proj.weight": rng.standard_normal((hidden, inter)) * 0.02}
    safetensors.numpy.save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(directory / "model.safetensors"))
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden, intermediate_size=inter,
                  num_hidden_layers=LAYERS, num_attention_heads=heads, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                  vocab_size=vocab, max_position_embeddings=CONTEXT, rms_norm_eps=1e-5, torch_dtype="float32",
                  bos_token_id=1, eos_token_id=2)
    (directory / "config.json").write_text(json.dumps(config))


def start_decode_worker(model_dir: Path, kv_mib: int) -> tuple[subprocess.Popen, str]:
    from splitserve.runtime.grpc_common import wait_until_serving
    from splitserve.runtime.launch import free_port

    port = free_port("127.0.0.1")
    gib = max(0.25, 2 * CONTEXT * LAYERS * KV_HEADS * HEAD_DIM * 4 * 2 / (1 << 30))  # two full requests
    cmd = [sys.executable, "-m", "splitserve.runtime.cli", "decode-worker", "--model", str(model_dir), "--port",
           str(port), "--platform", "cpu", "--kv-cache-gib", f"{gib:.3f}", "--max-batch", "8",
           "--warmup", "minimal"]  # nothing is decoded here: compiling every shape would only delay the start
    env = dict(os.environ, SPLITSERVE_LOG_LEVEL="WARNING")
    worker = subprocess.Popen(cmd, env=env)
    wait_until_serving(f"127.0.0.1:{port}", 300)
    return worker, f"127.0.0.1:{port}"


def handoff(address: str, total_bytes: int, chunk_bytes: int, transport: str) -> float:
    """Sends `total_bytes` of KV as requests of up to CONTEXT tokens over `transport` ("socket" or
    "grpc"); returns seconds."""
    from splitserve.protos import internal_pb2, internal_pb2_grpc
    from splitserve.runtime.grpc_common import ChannelPool
    from splitserve.runtime.metrics import WorkerMetrics
    from splitserve.runtime.prefill_engine import PrefillJob
    from splitserve.runtime.prefill_service import KVSender
    from splitserve.runtime.sampling_params import SamplingParams

    per_token = 2 * LAYERS * KV_HEADS * HEAD_DIM * 4
    tokens_left = total_bytes // per_token
    channels = ChannelPool()
    decode = internal_pb2_grpc.DecodeStub(channels.get(address))
    metrics = WorkerMetrics()  # which transport carried each transfer, and whether it was accepted
    sender = KVSender(channels, chunk_bytes=chunk_bytes, metrics=metrics)
    rng = np.random.default_rng(1)
    elapsed, n = 0.0, 0
    while tokens_left > 0:
        tokens = min(tokens_left, CONTEXT - 1)
        k = [rng.standard_normal((tokens, KV_HEADS, HEAD_DIM), dtype=np.float32) for _ in range(LAYERS)]
        v = [x * 0.5 for x in k]
        rid = f"bench-{transport}-{n}"
        reply = decode.Reserve(internal_pb2.ReserveRequest(request_id=rid, num_tokens=tokens + 1, lease_s=60))
        job = PrefillJob(rid, [0] * tokens, SamplingParams(), address)
        if transport == "socket":
            if not reply.kv_data_address:
                raise SystemExit("the decode worker named no KV data socket (started with --kv-transport grpc?)")
            job.kv_data_address, job.kv_ticket = reply.kv_data_address, reply.kv_ticket
        start = time.perf_counter()
        sender(job, 5, k, v)  # returns once the worker verified and accepted the KV
        elapsed += time.perf_counter() - start
        decode.Release(internal_pb2.ReleaseRequest(request_id=rid))
        tokens_left -= tokens
        n += 1
    channels.close()
    _check_carried(metrics, transport, n)
    return elapsed


def _check_carried(metrics, transport: str, transfers: int) -> None:
    """The sender falls back to TransferKV when the data port refuses, and counts a vanished
    reservation as handled: neither may pass for a measurement of `transport`."""
    sample = metrics.registry.get_sample_value
    carried = sample("splitserve_kv_transfers_total", {"direction": "sent", "transport": transport}) or 0
    failed = sample("splitserve_kv_transfer_failures_total", {"direction": "sent"}) or 0
    if carried != transfers or failed:
        raise SystemExit(f"{transport} handoff: {carried:.0f} of {transfers} transfers went by {transport}, "
                         f"{failed:.0f} failed; the figure would not measure that path")


TCP_SINK = """
import socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
conn, _ = s.accept(); total = int(sys.argv[1]); got = 0; buf = bytearray(1 << 20)
while got < total:
    n = conn.recv_into(buf)
    if not n: break
    got += n
conn.sendall(b"k"); conn.close()
"""


GRPC_SINK = """
import concurrent.futures, grpc
def sink(frames, context):
    return sum(len(f) for f in frames).to_bytes(8, "little")
server = grpc.server(concurrent.futures.ThreadPoolExecutor(4), options=[("grpc.max_receive_message_length", 1 << 26)])
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
    "bench.Sink", {"Bytes": grpc.stream_unary_rpc_method_handler(sink)}),))
print(server.add_insecure_port("127.0.0.1:0"), flush=True)
server.start()
server.wait_for_termination()
"""


def bare_grpc_transfer(total_bytes: int, chunk_bytes: int) -> float:
    """The ceiling of any gRPC handoff in Python here: the same bytes in chunk_bytes messages to a
    server that only counts them (no parsing, no checksum, no copy into KV buffers)."""
    import grpc

    sink = subprocess.Popen([sys.executable, "-c", GRPC_SINK], stdout=subprocess.PIPE, text=True)
    try:
        port = int(sink.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 1 << 26)]) as ch:
            send = ch.stream_unary("/bench.Sink/Bytes")
            payload = np.random.default_rng(3).bytes(chunk_bytes)
            send(iter([payload] * 4), timeout=60)  # warm the connection
            count = total_bytes // chunk_bytes
            start = time.perf_counter()
            send(iter([payload] * count), timeout=600)
            return (time.perf_counter() - start) * total_bytes / (count * chunk_bytes)
    finally:
        sink.kill()
        sink.wait()


def _reset_peak_rss(pid: int) -> int:
    """Resets the process's peak RSS (Linux clear_refs) and returns its current RSS in bytes."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    return _status_kib(pid, "VmRSS") << 10


def _peak_rss(pid: int) -> int:
    return _status_kib(pid, "VmHWM") << 10


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def tcp_transfer(total_bytes: int) -> float:
    sink = subprocess.Popen([sys.executable, "-c", TCP_SINK, str(total_bytes)], stdout=subprocess.PIPE, text=True)
    port = int(sink.stdout.readline())
    payload = np.random.default_rng(2).bytes(1 << 20)
    with socket.create_connection(("127.0.0.1", port)) as conn:
        start = time.perf_counter()
        sent = 0
        while sent < total_bytes:
            conn.sendall(payload[: min(len(payload), total_bytes - sent)])
            sent += min(len(payload), total_bytes - sent)
        conn.recv(1)  # the sink has everything
        elapsed = time.perf_counter() - start
    sink.wait()
    return elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kv-mib", type=int, default=512, help="MiB of KV to move (default 512)")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="KV chunk size (default 1024 KiB)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    args = parser.parse_args(argv)
    if args.kv_mib < 1 or args.chunk_kib < 1:
        parser.error(f"--kv-mib and --chunk-kib must be >= 1, got {args.kv_mib} and {args.chunk_kib}")
    total = args.kv_mib << 20
    chunk = min(args.chunk_kib << 10, total)  # a chunk larger than the KV is the whole KV
    with tempfile.TemporaryDirectory() as tmp:
        write_model(Path(tmp))
        worker, address = start_decode_worker(Path(tmp), args.kv_mib)
        try:
            # Warm up with one full-context request per transport: compiles nothing, but maps the decode
            # worker's reusable receive buffers, so the timed runs measure the steady state of a serving worker.
            warm = min(total, (CONTEXT - 1) * 2 * LAYERS * KV_HEADS * HEAD_DIM * 4)
            for transport in ("socket", "grpc"):
                handoff(address, warm, chunk, transport)
            rss_before = _reset_peak_rss(worker.pid)
            socket_s = handoff(address, total, chunk, "socket")
            rss_growth = _peak_rss(worker.pid) - rss_before
            grpc_s = handoff(address, total, chunk, "grpc")
        finally:
            worker.terminate()
            worker.wait(30)
    tcp_s = tcp_transfer(total)
    bare_s = bare_grpc_transfer(total, chunk)
    gbps = {name: total / seconds / 1e9 for name, seconds in
            (("socket", socket_s), ("grpc", grpc_s), ("bare", bare_s), ("tcp", tcp_s))}
    print(f"{'path':<38}{'MiB':>8}{'seconds':>10}{'GB/s':>8}{'/ TCP':>8}")
    for name, key, seconds in (("KV handoff, data socket (serving)", "socket", socket_s),
                               ("KV handoff, gRPC TransferKV (serving)", "grpc", grpc_s),
                               ("bare gRPC bytes stream (ceiling)", "bare", bare_s),
                               ("raw TCP socket (ceiling)", "tcp", tcp_s)):
        print(f"{name:<38}{args.kv_mib:>8}{seconds:>10.3f}{gbps[key]:>8.2f}{gbps[key] / gbps['tcp']:>8.2f}")
    print(f"socket handoff / TCP: {gbps['socket'] / gbps['tcp']:.2f}; gRPC handoff / TCP: "
          f"{gbps['grpc'] / gbps['tcp']:.2f}; socket / gRPC handoff: {gbps['socket'] / gbps['grpc']:.2f}"
          f"   (chunk {chunk >> 10} KiB)")
    budget = 2 * chunk + (64 << 20)  # 2 x chunk x chunks in flight (one per connection) + 64 MiB
    print(f"decode worker peak RSS growth during the socket handoff: {rss_growth / (1 << 20):.0f} MiB "
          f"(budget {budget / (1 << 20):.0f} MiB)")
    if args.json:
        print(json.dumps({"kv_bytes": total, "transfer_s": socket_s, "gbytes_per_s": gbps["socket"],
                          "tcp_gbytes_per_s": gbps["tcp"], "grpc_transfer_s": grpc_s, "grpc_gbytes_per_s": gbps["grpc"],
                          "bare_grpc_gbytes_per_s": gbps["bare"], "socket_over_tcp": gbps["socket"] / gbps["tcp"],
                          "grpc_over_tcp": gbps["grpc"] / gbps["tcp"], "decode_worker_peak_rss_growth_bytes": rss_growth,
                          "chunk_bytes": chunk}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
