"""tritonserver as the stack starts it: only loopback, and its model-repository API
(load, unload, index) refused without the repository key."""
from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from stack.triton import REPOSITORY_KEY_HEADER, TritonServer

pytestmark = pytest.mark.e2e


def _fakellm():
    import importlib.util
    path = Path(__file__).parents[1] / "fixtures" / "fakellm" / "__init__.py"
    spec = importlib.util.spec_from_file_location("fakellm_locked", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("locked")
    fake = _fakellm()
    fake.make_model_dir(tmp / "repo", "fake")
    s = TritonServer.on_free_ports(tmp / "repo", log_path=tmp / "triton.log",
                                   extra_backends={"fakellm": fake.MODEL_PY}).start_ready(120)
    yield s
    s.stop()


def _call(url: str, body: dict | None = None, key: str | None = None) -> int:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 method="GET" if body is None else "POST")
    if key is not None:
        req.add_header(REPOSITORY_KEY_HEADER, key)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def test_model_control_needs_the_key(server):
    base = server.http_url + "/v2/repository"
    for path in ("/models/fake/unload", "/models/fake/load", "/index"):
        assert _call(base + path, {}) == 403, path
        assert _call(base + path, {}, key="wrong") == 403, path
    assert _call(server.http_url + "/v2/models/fake/ready") == 200  # still serving
    assert _call(base + "/index", {}, key=server.repository_key) == 200
    assert _call(base + "/models/fake/load", {}, key=server.repository_key) == 200  # explicit mode: loads


def test_model_control_over_grpc_needs_the_key(server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match="restricted"):
        client.unload_model("fake")
    assert client.is_model_ready("fake")
    # Triton's gRPC frontend expects the header with a prefix of its own.
    assert client.get_model_repository_index(
        headers={"triton-grpc-protocol-" + REPOSITORY_KEY_HEADER: server.repository_key})


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as /proc shows them) of the TCP sockets listening on `port`."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, _, hexport = local.rpartition(":")
            if state == "0A" and int(hexport, 16) == port:
                out.add(addr)
    return out


def test_nothing_listens_beyond_loopback(server):
    for port in (server.http_port, server.grpc_port, server.metrics_port):
        addrs = _listening(port)  # 127.0.0.1, as IPv4 or IPv4-mapped IPv6
        assert addrs and addrs <= {"0100007F", "0000000000000000FFFF00000100007F"}, (port, addrs)
    others = {a for a in socket.gethostbyname_ex(socket.gethostname())[2] if not a.startswith("127.")}
    for addr in others:  # where the machine has another address, a connection there is refused
        with pytest.raises(OSError):
            socket.create_connection((addr, server.http_port), timeout=2).close()
