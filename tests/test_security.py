"""API key, internal token, TLS and listen-address rules on real gRPC servers on loopback (no model).

The launched stack with all of it switched on is in test_secure_stack.py.
"""

import logging
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from certs import make_pki
from splitserve.protos import internal_pb2, internal_pb2_grpc, serving_pb2, serving_pb2_grpc
from splitserve.runtime.auth import read_secret, require_api_key
from splitserve.runtime.client import Client, SplitserveError
from splitserve.runtime.grpc_common import PUBLIC_OPTIONS, ChannelPool, add_health, listen, make_server, set_serving
from splitserve.runtime.security import InternalSecurity
from splitserve.runtime.tls import TLSConfig, check_listen_address, is_loopback, server_credentials

KEY = "k3y-" + "x" * 28
TOKEN = "t0ken-" + "y" * 26


class FakeServing(serving_pb2_grpc.ServingServicer):
    def Generate(self, request, context):
        yield serving_pb2.GenerateResponse(token_ids=[7], text="hi", finish_reason="length")

    def ModelInfo(self, request, context):
        return serving_pb2.ModelInfoResponse(name="fake", vocab_size=11)


class FakeDecode(internal_pb2_grpc.DecodeServicer):
    """One method of each kind the workers serve: unary, client stream (TransferKV), server stream."""

    def Release(self, request, context):
        return internal_pb2.ReleaseResponse(released=request.request_id == "r1")

    def TransferKV(self, request_iterator, context):
        return internal_pb2.TransferKVResponse(received_bytes=sum(len(c.payload.data) for c in request_iterator))

    def Stream(self, request, context):
        yield internal_pb2.DecodeTokens(token_ids=[1, 2], finish_reason="stop")


def _serve(add_servicer, *, options=PUBLIC_OPTIONS, interceptors=(), credentials=None, reflection_of=None):
    server = make_server(options, interceptors, max_workers=4)
    add_servicer(server)
    set_serving(add_health(server))
    if reflection_of:
        reflection.enable_server_reflection((reflection_of, reflection.SERVICE_NAME), server)
    port = listen(server, "127.0.0.1", 0, credentials)
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def router_like():
    """The public Serving API behind the API-key interceptor, with health and reflection."""
    server, address = _serve(lambda s: serving_pb2_grpc.add_ServingServicer_to_server(FakeServing(), s),
                             interceptors=[require_api_key(KEY)], reflection_of="splitserve.v1.Serving")
    yield address
    server.stop(None)


@pytest.fixture
def worker_like():
    security = InternalSecurity(token=TOKEN)
    server, address = _serve(lambda s: internal_pb2_grpc.add_DecodeServicer_to_server(FakeDecode(), s),
                             interceptors=security.worker_interceptors())
    yield address
    server.stop(None)


@pytest.mark.parametrize("api_key, problem", [(None, "missing API key"), ("wrong", "invalid API key"),
                                              (KEY + "x", "invalid API key"), (KEY[:-1], "invalid API key")])
def test_every_public_method_needs_the_api_key(router_like, api_key, problem):
    with Client(router_like, api_key=api_key, max_retries=0) as client:
        for call in (lambda: client.generate("hi", max_tokens=1), client.model_info):
            with pytest.raises(SplitserveError) as err:
                call()
            assert err.value.code is grpc.StatusCode.UNAUTHENTICATED and problem in err.value.message
            assert KEY not in err.value.message and (api_key is None or api_key not in err.value.message)


def test_the_right_key_passes_and_health_and_reflection_stay_open(router_like):
    with Client(router_like, api_key=KEY) as client:
        assert client.generate("hi", max_tokens=1).token_ids == [7]
        assert client.model_info().name == "fake"
    with grpc.insecure_channel(router_like) as channel:  # no key at all
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for r in replies for s in r.list_services_response.service}
        assert "splitserve.v1.Serving" in names


def test_a_raw_bearer_header_is_what_the_router_checks(router_like):
    stub = serving_pb2_grpc.ServingStub(grpc.insecure_channel(router_like))
    assert stub.ModelInfo(serving_pb2.ModelInfoRequest(), metadata=[("authorization", f"Bearer {KEY}")]).name == "fake"
    for metadata in ([("authorization", KEY)], [("x-api-key", KEY)],
                     [("authorization", f"Bearer {KEY}"), ("authorization", "Bearer other")]):
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfo(serving_pb2.ModelInfoRequest(), metadata=metadata, timeout=5)
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED


def _kv_chunks():
    yield internal_pb2.KVChunk(payload=internal_pb2.KVPayload(data=b"abc"))
    yield internal_pb2.KVChunk(payload=internal_pb2.KVPayload(data=b"de"))


def _calls(channel: grpc.Channel):
    """Each kind of call a worker gets, the KV stream also as raw bytes through channel.stream_unary."""
    stub = internal_pb2_grpc.DecodeStub(channel)
    raw_transfer = channel.stream_unary("/splitserve.internal.v1.Decode/TransferKV")  # no (de)serializers: bytes
    return {
        "unary": lambda: stub.Release(internal_pb2.ReleaseRequest(request_id="r1"), timeout=5).released,
        "client stream": lambda: stub.TransferKV(_kv_chunks(), timeout=5).received_bytes,
        "raw bytes stream": lambda: internal_pb2.TransferKVResponse.FromString(
            raw_transfer((c.SerializeToString() for c in _kv_chunks()), timeout=5)).received_bytes,
        "server stream": lambda: [t for m in stub.Stream(internal_pb2.DecodeRequest(), timeout=5) for t in m.token_ids],
    }


def test_the_channel_pool_attaches_the_internal_token_to_every_kind_of_call(worker_like):
    pool = ChannelPool(token=TOKEN)
    calls = _calls(pool.get(worker_like))
    assert {name: call() for name, call in calls.items()} == {
        "unary": True, "client stream": 5, "raw bytes stream": 5, "server stream": [1, 2]}
    pool.close()


@pytest.mark.parametrize("token", [None, "wrong", TOKEN[:-1]])
def test_workers_reject_calls_without_the_internal_token(worker_like, token):
    pool = ChannelPool(token=token)
    for name, call in _calls(pool.get(worker_like)).items():
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED, name
        assert TOKEN not in err.value.details()
    pool.close()


def test_the_rejection_is_logged_without_the_secret(router_like, caplog):
    caplog.set_level(logging.DEBUG)
    with Client(router_like, api_key=KEY[:-1] + "z", max_retries=0) as client:
        with pytest.raises(SplitserveError):
            client.model_info()
    assert "rejected /splitserve.v1.Serving/ModelInfo" in caplog.text
    assert KEY[:-1] not in caplog.text


# -- TLS --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    return make_pki(root, "internal"), make_pki(root, "rogue")


def test_the_router_port_serves_tls_that_the_sdk_verifies_with_a_root_cert(pki):
    ours, rogue = pki
    tls = TLSConfig(ours.cert, ours.key)
    server, address = _serve(lambda s: serving_pb2_grpc.add_ServingServicer_to_server(FakeServing(), s),
                             credentials=server_credentials(tls, require_client_cert=False))
    try:
        with Client(address, tls=ours.ca) as client:
            assert client.model_info().name == "fake"
        with Client(address, tls=grpc.ssl_channel_credentials(open(ours.ca, "rb").read())) as client:
            assert client.health() == "SERVING"
        for wrong in (None, rogue.ca):  # plaintext, or a CA that did not sign it
            with Client(address, tls=wrong, max_retries=0) as client:
                with pytest.raises(SplitserveError) as err:
                    client.model_info(timeout=5)
                assert err.value.code is grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)


def test_mutual_tls_workers_accept_only_client_certs_their_ca_signed(pki):
    ours, rogue = pki
    security = InternalSecurity(TLSConfig(ours.cert, ours.key, ours.ca), TOKEN)
    server, address = _serve(lambda s: internal_pb2_grpc.add_DecodeServicer_to_server(FakeDecode(), s),
                             credentials=security.worker_credentials(), interceptors=security.worker_interceptors())
    try:
        pool = security.channels()  # what the router and the prefill workers use
        assert {name: call() for name, call in _calls(pool.get(address)).items()}["raw bytes stream"] == 5
        pool.close()
        ca = open(ours.ca, "rb").read()
        strangers = {
            "no client cert": grpc.ssl_channel_credentials(ca),
            "cert of another CA": grpc.ssl_channel_credentials(ca, open(rogue.key, "rb").read(),
                                                               open(rogue.cert, "rb").read()),
        }
        for name, credentials in strangers.items():
            pool = ChannelPool(credentials, TOKEN)
            with pytest.raises(grpc.RpcError) as err:
                _calls(pool.get(address))["unary"]()
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE, name
            pool.close()
        plaintext = ChannelPool(token=TOKEN)
        with pytest.raises(grpc.RpcError):
            _calls(plaintext.get(address))["unary"]()
        plaintext.close()
    finally:
        server.stop(None)


def test_tls_config_rejects_half_settings(pki):
    ours, _ = pki
    with pytest.raises(ValueError, match="go together"):
        TLSConfig(cert=ours.cert)
    with pytest.raises(ValueError, match="needs --tls-cert"):
        TLSConfig(ca=ours.ca)
    with pytest.raises(ValueError, match="cannot read the TLS key /nonexistent"):
        server_credentials(TLSConfig(ours.cert, "/nonexistent"), require_client_cert=False)


# -- where to listen, and where secrets come from -------------------------------------------------

def test_plaintext_off_loopback_needs_allow_insecure_and_warns(pki, caplog):
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.5"):
        assert is_loopback(host)
        check_listen_address(host, TLSConfig(), allow_insecure=False)
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.com"):
        assert not is_loopback(host)
        with pytest.raises(ValueError, match=f"refusing to listen on {host} without TLS"):
            check_listen_address(host, TLSConfig(), allow_insecure=False)
    check_listen_address("0.0.0.0", TLSConfig(pki[0].cert, pki[0].key), allow_insecure=False)
    assert "WITHOUT TLS" not in caplog.text
    with caplog.at_level(logging.WARNING):
        check_listen_address("0.0.0.0", TLSConfig(), allow_insecure=True)
    assert "listening on 0.0.0.0 WITHOUT TLS" in caplog.text


@pytest.mark.parametrize("command", [["router", "--prefill", "a:1", "--decode", "b:1"], ["decode-worker"],
                                     ["launch"]])
def test_the_cli_refuses_plaintext_off_loopback_before_loading_anything(command):
    result = subprocess.run([sys.executable, "-m", "splitserve.runtime.cli", *command, "--host", "0.0.0.0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "refusing to listen on 0.0.0.0 without TLS" in result.stderr and "--allow-insecure" in result.stderr
    assert "Traceback" not in result.stderr


def test_secrets_come_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("SPLITSERVE_TEST_SECRET", raising=False)
    assert read_secret("SPLITSERVE_TEST_SECRET", None, "API key") is None
    monkeypatch.setenv("SPLITSERVE_TEST_SECRET", " from-env\n")
    assert read_secret("SPLITSERVE_TEST_SECRET", None, "API key") == "from-env"
    (tmp_path / "key").write_text("from-file\n")
    assert read_secret("SPLITSERVE_TEST_SECRET", str(tmp_path / "key"), "API key") == "from-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_secret("SPLITSERVE_TEST_SECRET", str(tmp_path / "empty"), "API key")
    with pytest.raises(ValueError, match="cannot read the API key file"):
        read_secret("SPLITSERVE_TEST_SECRET", str(tmp_path / "missing"), "API key")
