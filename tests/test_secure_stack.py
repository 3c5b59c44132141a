"""A launched stack with everything on: TLS (mutual between router and workers), an API key, the
internal token, DEBUG logs, and the OpenAI-compatible server over HTTPS. Real processes on
loopback; certificates made at test time."""

import asyncio
import json
import os
import secrets
import ssl
import subprocess
import sys
import time

import grpc
import pytest

from certs import make_pki
from stack import launched
from splitserve.protos import internal_pb2, internal_pb2_grpc, serving_pb2, serving_pb2_grpc
from splitserve.runtime.client import AsyncClient, Client, SplitserveError
from splitserve.runtime.grpc_common import INTERNAL_MAX_MESSAGE_BYTES, PUBLIC_MAX_MESSAGE_BYTES

KEY = secrets.token_urlsafe(24)
WRONG_KEY = KEY[:-4] + "oops"  # a near miss, as a typo would be: it must not be echoed either
MiB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), "stack")


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def stack(pki, tmp_path_factory):
    env = {"SPLITSERVE_CACHE": os.environ.get("SPLITSERVE_CACHE") or str(tmp_path_factory.mktemp("cache")),
           "SPLITSERVE_API_KEY": KEY, "SPLITSERVE_LOG_LEVEL": "DEBUG", "GRPC_VERBOSITY": "DEBUG"}
    with launched("demo", "--tls-cert", pki.cert, "--tls-key", pki.key, "--tls-ca", pki.ca,
                  "--num-pages", "64", "--page-size", "8", "--openai-port", "0", "--served-model-name", "demo",
                  env=env,
                  credentials=grpc.ssl_channel_credentials(_read(pki.ca)),
                  metadata=[("authorization", f"Bearer {KEY}")]) as s:
        yield s


@pytest.fixture(scope="module")
def internal_token(stack):
    """The token launch made, read from the workers' environment (where launch put it, not argv)."""
    environs = [stack.worker_environ(pid) for pid in workers(stack)]
    assert len(environs) == 2 and not any("SPLITSERVE_API_KEY" in env for env in environs)  # not the public key
    tokens = {env["SPLITSERVE_INTERNAL_TOKEN"] for env in environs}
    assert len(tokens) == 1  # one per run, shared by every worker
    token = tokens.pop()
    assert len(token) >= 32
    return token


def workers(stack) -> list[int]:
    """launch's model workers (not its openai-server child)."""
    return [pid for pid in stack.worker_pids() if b"openai-server" not in _proc(pid, "cmdline")]


def _proc(pid: int, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read()


def test_the_sdk_streams_over_tls_with_the_api_key(stack, pki):
    with Client(stack.address, api_key=KEY, tls=pki.ca) as client:
        out = client.generate("The weather today is", max_tokens=8, ignore_eos=True)
        info = client.model_info()
    assert out.finish_reason == "length" and len(out.token_ids) == 8
    assert sorted(w.role for w in info.workers) == ["decode", "prefill"]
    assert all(w.address.startswith("127.0.0.1:") for w in info.workers)  # launch keeps workers on loopback
    tokens, _, _ = stack.generate(text="The weather today is", max_tokens=8, ignore_eos=True)
    assert tokens == out.token_ids

    async def main():
        async with AsyncClient(stack.address, api_key=KEY, tls=pki.ca) as client:
            return await client.generate("The weather today is", max_tokens=8, ignore_eos=True)

    assert asyncio.run(main()).token_ids == out.token_ids


def test_cli_generate_takes_the_key_from_the_environment_and_a_ca_file(stack, pki):
    def generate(*flags, key=None):
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env.pop("SPLITSERVE_API_KEY", None)
        env.update({"SPLITSERVE_API_KEY": key} if key else {})
        return subprocess.run([sys.executable, "-m", "splitserve.runtime.cli", "generate", "Hello", "--address",
                               stack.address, "--max-tokens", "4", "--ignore-eos", "--json", *flags],
                              capture_output=True, text=True, env=env, timeout=120)

    ok = generate("--tls-ca", pki.ca, key=KEY)
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout.strip().splitlines()[-1])["token_ids"]) == 4
    no_key = generate("--tls-ca", pki.ca)
    assert no_key.returncode != 0 and "UNAUTHENTICATED: missing API key" in no_key.stderr


def test_a_missing_or_wrong_key_is_unauthenticated_and_health_stays_open(stack, pki):
    for api_key in (None, WRONG_KEY):
        with Client(stack.address, api_key=api_key, tls=pki.ca, max_retries=0) as client:
            for call in (lambda: client.generate("hi", max_tokens=2), client.model_info):
                with pytest.raises(SplitserveError) as err:
                    call()
                assert err.value.code is grpc.StatusCode.UNAUTHENTICATED
                assert KEY not in str(err.value) and WRONG_KEY not in str(err.value)
            assert client.health() == "SERVING"
    with Client(stack.address, api_key=KEY, max_retries=0) as plaintext:
        with pytest.raises(SplitserveError) as err:
            plaintext.model_info(timeout=10)
        assert err.value.code is grpc.StatusCode.UNAVAILABLE


def _channel(address: str, credentials: grpc.ChannelCredentials) -> grpc.Channel:
    return grpc.secure_channel(address, credentials, options=[("grpc.max_send_message_length", 64 * MiB)])


def _stats(worker, credentials, metadata=()):
    stub = (internal_pb2_grpc.PrefillStub if worker.role == "prefill" else internal_pb2_grpc.DecodeStub)(
        _channel(worker.address, credentials))
    return stub.Stats(internal_pb2.StatsRequest(), timeout=10, metadata=metadata)


def test_workers_need_a_client_certificate_and_the_internal_token(stack, pki, internal_token):
    ca, cert, key = _read(pki.ca), _read(pki.cert), _read(pki.key)
    mutual = grpc.ssl_channel_credentials(ca, key, cert)
    for pid in stack.worker_pids():
        assert internal_token.encode() not in _proc(pid, "cmdline")
    for worker in stack.workers():
        with pytest.raises(grpc.RpcError) as err:  # TLS, but no client certificate
            _stats(worker, grpc.ssl_channel_credentials(ca))
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as err:  # the right certificate, no token
            _stats(worker, mutual)
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        stats = _stats(worker, mutual, metadata=[("authorization", f"Bearer {internal_token}")])
        assert stats.role == worker.role


def _generate_of_size(num_bytes: int) -> serving_pb2.GenerateRequest:
    """A Generate request of about num_bytes: token id 5 is one byte on the wire. max_tokens=0 is invalid,
    so a request that gets past the size check is refused cheaply (INVALID_ARGUMENT)."""
    request = serving_pb2.GenerateRequest(sampling=serving_pb2.SamplingParams(max_tokens=0))
    request.token_ids.ids.extend([5] * num_bytes)
    return request


def test_messages_over_the_caps_are_resource_exhausted(stack, pki, internal_token):
    assert PUBLIC_MAX_MESSAGE_BYTES == 8 * MiB and INTERNAL_MAX_MESSAGE_BYTES == 16 * MiB
    channel = grpc.secure_channel(stack.address, grpc.ssl_channel_credentials(_read(pki.ca)),
                                  options=[("grpc.max_send_message_length", 64 * MiB)])
    generate = serving_pb2_grpc.ServingStub(channel).Generate
    auth = [("authorization", f"Bearer {KEY}")]
    codes = {}
    for size in (6 * MiB, 9 * MiB):  # above gRPC's 4 MiB default, under and over ours
        with pytest.raises(grpc.RpcError) as err:
            list(generate(_generate_of_size(size), timeout=60, metadata=auth))
        codes[size] = err.value.code()
    assert codes == {6 * MiB: grpc.StatusCode.INVALID_ARGUMENT, 9 * MiB: grpc.StatusCode.RESOURCE_EXHAUSTED}
    channel.close()

    mutual = grpc.ssl_channel_credentials(_read(pki.ca), _read(pki.key), _read(pki.cert))
    token = [("authorization", f"Bearer {internal_token}")]
    decode = next(w for w in stack.workers() if w.role == "decode")
    release = internal_pb2_grpc.DecodeStub(_channel(decode.address, mutual)).Release
    assert not release(internal_pb2.ReleaseRequest(request_id="x" * (12 * MiB)), timeout=60, metadata=token).released
    with pytest.raises(grpc.RpcError) as err:
        release(internal_pb2.ReleaseRequest(request_id="x" * (17 * MiB)), timeout=60, metadata=token)
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_kv_data_socket_takes_only_mutual_tls(stack, pki, internal_token):
    """The decode worker's data socket under --tls-ca (the default transport, so the requests above sent
    their KV there): a sender with the client certificate gets in; without it, or without TLS, it does not."""
    import numpy as np

    from splitserve.runtime.kv_socket import send_kv
    from splitserve.runtime.kv_wire import kv_frame_parts
    from splitserve.runtime.tls import TLSConfig, client_ssl_context

    mutual = grpc.ssl_channel_credentials(_read(pki.ca), _read(pki.key), _read(pki.cert))
    decode = next(w for w in stack.workers() if w.role == "decode")
    stub = internal_pb2_grpc.DecodeStub(_channel(decode.address, mutual))
    token = [("authorization", f"Bearer {internal_token}")]
    reply = stub.Reserve(internal_pb2.ReserveRequest(request_id="tls-kv", num_tokens=16, lease_s=30), timeout=10,
                         metadata=token)
    assert reply.kv_data_address.startswith("127.0.0.1:") and reply.kv_data_address != decode.address
    layers = [np.full((8, 4, 32), i, np.float32) for i in range(4)]  # the demo model's layout

    def send(context):
        return send_kv(reply.kv_data_address, "tls-kv", reply.kv_ticket, kv_frame_parts("tls-kv", 5, layers, layers),
                       timeout_s=10, ssl_context=context)

    for refused in (None, ssl.create_default_context(cafile=pki.ca)):  # plaintext; TLS without a client certificate
        with pytest.raises(OSError):
            send(refused)
    assert send(client_ssl_context(TLSConfig(pki.cert, pki.key, pki.ca))) == 2 * sum(x.nbytes for x in layers)
    assert stub.Release(internal_pb2.ReleaseRequest(request_id="tls-kv"), timeout=10, metadata=token).released


def test_the_openai_server_serves_https_with_the_key_and_checks_the_router_with_the_ca(stack, pki):
    """launch --openai-port with TLS: the child serves HTTPS with launch's certificate, wants the API
    key, reaches the router over TLS checked against --tls-ca, and has the key from its environment."""
    import http.client
    import re
    import urllib.error
    import urllib.request

    import openai

    url = re.search(r"openai-server on (https://\S+/v1)", "".join(stack.lines)).group(1)
    ca_context = ssl.create_default_context(cafile=pki.ca)
    with Client(stack.address, api_key=KEY, tls=pki.ca) as sdk:
        want = sdk.generate("Once upon a time", max_tokens=6, ignore_eos=True)
    with openai.OpenAI(base_url=url, api_key=KEY, max_retries=0,
                       http_client=openai.DefaultHttpxClient(verify=ca_context)) as client:
        got = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=6,
                                        extra_body={"ignore_eos": True})
    assert got.choices[0].text == want.text
    with openai.OpenAI(base_url=url, api_key=WRONG_KEY, max_retries=0,
                       http_client=openai.DefaultHttpxClient(verify=ca_context)) as client:
        with pytest.raises(openai.AuthenticationError):
            client.completions.create(model="demo", prompt="x", max_tokens=2)
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):  # no plain HTTP there
        urllib.request.urlopen(url.replace("https://", "http://") + "/models", timeout=5)
    child = next(pid for pid in stack.worker_pids() if b"openai-server" in _proc(pid, "cmdline"))
    assert KEY.encode() not in _proc(child, "cmdline") and b"--tls-ca" in _proc(child, "cmdline")


def test_no_secret_reaches_any_log(stack, pki, internal_token):
    """Runs last: the calls above (wrong key, no token) were all logged at DEBUG by launch and its workers."""
    with Client(stack.address, api_key=WRONG_KEY, tls=pki.ca, max_retries=0) as client:
        with pytest.raises(SplitserveError) as err:
            client.generate("hi", max_tokens=2)
    assert KEY not in err.value.message and WRONG_KEY not in err.value.message
    time.sleep(1.0)  # let the reader thread catch up with the pipe
    output = "".join(stack.lines)
    assert " DEBUG " in output  # the logs really were at DEBUG
    assert "rejected /splitserve.v1.Serving/Generate" in output and "invalid API key" in output
    assert "/Stats from" in output and "missing internal token" in output  # the workers' rejections
    for secret in (KEY, WRONG_KEY, internal_token):
        assert secret not in output
