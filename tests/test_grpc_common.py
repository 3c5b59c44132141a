"""Servers made by grpc_common: a port in use is an error, not a shared port."""

import pytest

from splitserve.runtime.grpc_common import listen, make_server


def test_a_second_server_on_a_port_in_use_fails_to_start():
    """gRPC's default SO_REUSEPORT let a second launch bind the same port and take half the new
    connections, while reporting itself ready."""
    first = make_server(max_workers=2)
    port = listen(first, "127.0.0.1", 0, None)
    first.start()
    second = make_server(max_workers=2)
    try:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            listen(second, "127.0.0.1", port, None)
    finally:
        first.stop(None)
        second.stop(None)
    again = make_server(max_workers=2)  # a restart on the same port, once it is free, still binds
    assert listen(again, "127.0.0.1", port, None) == port
    again.stop(None)
