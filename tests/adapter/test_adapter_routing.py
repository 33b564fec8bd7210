"""Which version a request goes to: routes, canaries, pins (pure)."""
from __future__ import annotations

import pytest

from openai_adapter.errors import OpenAIError
from openai_adapter.routing import Route, choose, split_pin


def test_split_pin():
    assert split_pin("m") == ("m", None)
    assert split_pin("m@2") == ("m", 2)
    assert split_pin("org/m@12") == ("org/m", 12)
    for bad in ("m@", "m@x", "@2", "m@-1"):
        with pytest.raises(OpenAIError) as err:
            split_pin(bad)
        assert err.value.status == 400 and err.value.param == "model"


def test_no_route_is_the_newest_ready_version():
    assert choose("m", None, {1, 2, 3}, None) == 3


def test_route_holds_traffic_on_the_serving_version_while_a_candidate_is_loaded():
    assert choose("m", Route(serving=1), {1, 2}, None) == 1
    assert choose("m", Route(serving=2, previous=1), {1, 2}, None) == 2


def test_canary_share():
    route = Route(serving=1, canary=2, canary_percent=25)
    picks = [choose("m", route, {1, 2}, None, draw=lambda x=i: x / 100) for i in range(100)]
    assert picks.count(2) == 25 and picks.count(1) == 75
    assert choose("m", route, {1}, None, draw=lambda: 0.0) == 1  # canary not loaded here


def test_never_falls_forward_to_an_unvalidated_version():
    assert choose("m", Route(serving=2, previous=1), {1, 3}, None) == 1
    with pytest.raises(OpenAIError) as err:
        choose("m", Route(serving=2), {3}, None)
    assert err.value.status == 503 and err.value.code == "model_not_ready"


def test_pins():
    assert choose("m", Route(serving=1), {1, 2}, 2) == 2
    with pytest.raises(OpenAIError) as err:
        choose("m", Route(serving=1), {1, 2}, 7)
    assert err.value.status == 404 and "loaded: 1, 2" in err.value.message


async def test_dns_endpoints_are_every_address_and_follow_the_service(monkeypatch):
    import socket

    from openai_adapter.settings import Settings
    from openai_adapter.triton_client import TritonPool, resolve_specs

    answers = {"triton-headless": ["10.0.0.2", "10.0.0.1"]}

    def fake_getaddrinfo(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    s = Settings(triton_grpc_urls=["dns:triton-headless:8001"])
    assert s.triton_http_urls == ["dns:triton-headless:8000"]
    assert resolve_specs(list(zip(s.triton_grpc_urls, s.triton_http_urls))) == [
        ("10.0.0.1:8001", "http://10.0.0.1:8000"), ("10.0.0.2:8001", "http://10.0.0.2:8000")]
    seen = []
    pool = TritonPool(s.triton_grpc_urls, s.triton_http_urls, on_endpoint=seen.append)
    assert [ep.grpc_url for ep in pool.endpoints] == ["10.0.0.1:8001", "10.0.0.2:8001"]
    first = pool.endpoints[0]
    answers["triton-headless"] = ["10.0.0.1", "10.0.0.3"]  # a pod replaced
    pool._reconcile(resolve_specs(pool._specs))
    assert [ep.grpc_url for ep in pool.endpoints] == ["10.0.0.1:8001", "10.0.0.3:8001"]
    assert pool.endpoints[0] is first  # kept, with its circuit and load
    assert [ep.grpc_url for ep in seen] == ["10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001"]
    assert [ep.grpc_url for ep in pool._dropped] == ["10.0.0.2:8001"]
    await pool.close()
