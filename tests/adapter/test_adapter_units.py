"""Pure unit tests of the adapter's building blocks."""
from __future__ import annotations

import numpy as np
import pytest

from openai_adapter import chat_template
from openai_adapter.errors import ClientGone, OpenAIError, from_model_message
from openai_adapter.settings import Settings
from openai_adapter.stop import StopChecker
from openai_adapter.triton_client import CircuitBreaker, GenerationRequest, build_inputs


def test_stop_checker_holds_back_possible_prefix_and_cuts():
    s = StopChecker(["END"])
    assert s.feed("abc E") == ("abc ", False)
    assert s.feed("N") == ("", False)
    assert s.feed("Dxyz") == ("", True)
    s = StopChecker(["END"])
    assert s.feed("abc EN") == ("abc ", False)
    assert s.feed("x") == ("ENx", False)
    assert s.flush() == ""
    assert StopChecker([]).feed("anything") == ("anything", False)
    s = StopChecker(["\n\n", "###"])
    assert s.feed("a\n") == ("a", False)
    assert s.feed("\nb") == ("", True)


def test_circuit_breaker_opens_after_failures_and_probe_closes_after_open_time():
    b = CircuitBreaker(failures=2, open_s=0.0)
    b.record_failure()
    assert not b.is_open
    b.record_failure()
    assert b.is_open
    b.probe_succeeded()
    assert not b.is_open
    b = CircuitBreaker(failures=3, open_s=60)
    b.trip()
    b.probe_succeeded()
    assert b.is_open  # not before open_s


@pytest.mark.parametrize("message,status,code", [
    ("invalid_request: temperature must be >= 0, got -1", 400, None),
    ("context_length_exceeded: context length 2048, prompt 3000", 400, "context_length_exceeded"),
    ("over_capacity: 64 requests waiting", 429, "over_capacity"),
    ("internal: onnxruntime failed", 500, "internal_error"),
    ("[StatusCode.UNAVAILABLE] Exceeds maximum queue size", 429, "over_capacity"),
    ("Request for unknown model: 'x' is not found", 503, "model_not_ready"),
    ("something odd in /opt/tritonserver/x.cc:12", 500, "upstream_error"),
])
def test_model_error_prefixes_map(message, status, code):
    err = from_model_message(message, 1)
    assert isinstance(err, OpenAIError) and err.status == status and err.code == code
    assert not err.message.startswith(("invalid_request:", "internal:", "over_capacity:"))
    assert "/opt" not in err.message
    if status == 429:
        assert err.headers() == {"Retry-After": "1"}


def test_cancelled_prefix_means_client_gone():
    assert isinstance(from_model_message("cancelled: request cancelled", 1), ClientGone)


SMOL = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
        "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_chat_template_like_transformers():
    out = chat_template.render(SMOL, [{"role": "user", "content": "Hi"}])
    assert out == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                   "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_errors_are_400():
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(OpenAIError) as err:
        chat_template.render(strict, [{"role": "system", "content": "x"}])
    assert err.value.status == 400 and "System role not supported" in err.value.message
    with pytest.raises(OpenAIError) as err:
        chat_template.render("{% for %}", [{"role": "user", "content": "x"}])
    assert err.value.status == 400
    with pytest.raises(OpenAIError) as err:
        chat_template.render("", [{"role": "user", "content": "x"}], model="m")
    assert err.value.status == 400 and "no chat template" in err.value.message
    with pytest.raises(OpenAIError):  # the sandbox refuses attribute games
        chat_template.render("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", [])


def test_settings_from_env_and_redaction():
    s = Settings.from_env({"ADAPTER_PORT": "9100", "TRITON_GRPC_URLS": "a:1, b:2",
                           "TRITON_HTTP_URLS": "http://a:3,http://b:4", "ADAPTER_API_KEYS": "secret1,secret2",
                           "ADAPTER_HEALTH_PROBE_GENERATION": "false"})
    assert s.port == 9100 and s.triton_grpc_urls == ["a:1", "b:2"] and s.health_probe_generation is False
    red = s.redacted()
    assert "secret1" not in repr(red) and red["api_keys"] == "<2 redacted>"
    assert Settings.from_env({"TRITON_GRPC_URLS": "a:8001,b:9001"}).triton_http_urls == ["http://a:8000", "http://b:9000"]
    with pytest.raises(ValueError, match="TRITON_HTTP_URLS"):
        Settings.from_env({"TRITON_GRPC_URLS": "a:1,b:2", "TRITON_HTTP_URLS": "http://a:0"})
    with pytest.raises(ValueError, match="ADAPTER_PORT"):
        Settings.from_env({"ADAPTER_PORT": "ninety"})


def test_build_inputs_shapes_and_types():
    req = GenerationRequest(model="m", prompt="hi", max_tokens=5, stop=["a", "bc"], temperature=0.0, seed=-1)
    inputs = {i.name(): i for i in build_inputs(req)}
    assert inputs["text_input"].shape() == [1, 1] and inputs["text_input"].datatype() == "BYTES"
    assert inputs["max_tokens"].shape() == [1, 1] and inputs["max_tokens"].datatype() == "INT32"
    assert inputs["stop_words"].shape() == [1, 2]
    assert inputs["seed"].datatype() == "UINT64"
    for flag in ("stream", "exclude_input_in_output", "return_num_input_tokens", "return_num_output_tokens"):
        assert inputs[flag].datatype() == "BOOL"
    assert "top_p" not in inputs  # unset means the model's default
    ids = {i.name(): i for i in build_inputs(GenerationRequest(model="m", prompt=[1, 2, 3]))}
    assert ids["input_ids"].shape() == [1, 3] and "text_input" not in ids and "max_tokens" not in ids


async def test_pool_picks_least_loaded_usable_endpoint():
    from openai_adapter.triton_client import TritonPool
    pool = TritonPool(["a:1", "b:1", "c:1"], ["http://a:2", "http://b:2", "http://c:2"])
    try:
        a, b, c = pool.endpoints
        from openai_adapter.triton_client import ModelInfo
        for ep in pool.endpoints:
            ep.models = {"m": ModelInfo("m")}
            ep.ready = {"m"}
            ep.reachable = True
        a.in_flight, b.in_flight, c.in_flight = 3, 1, 2
        assert pool.pick("m") is b
        b.breaker.trip()  # open circuit: skipped
        assert pool.pick("m") is c
        c.ready = set()  # model not ready there: skipped
        assert pool.pick("m") is a
        a.breaker.trip()
        assert pool.pick("m") is None
        with pytest.raises(OpenAIError) as err:
            pool.model("m")
        assert err.value.status == 503 and err.value.retry_after == 1
    finally:
        for ep in pool.endpoints:
            await ep.close()


def test_utf8_split_across_responses_stays_whole():
    import codecs
    from openai_adapter.triton_client import parse_chunk

    class Result:
        def __init__(self, text):
            self.text = text

        def as_numpy(self, name):
            return np.array([[self.text]], dtype=object) if name == "text_output" else None

    data = "é中😀".encode()
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    out = "".join(parse_chunk(Result(data[i:i + 1]), dec).text for i in range(len(data)))
    assert out == "é中😀"


def test_adapter_never_imports_the_model_code():
    import subprocess
    import sys
    code = ("import sys, openai_adapter.main, openai_adapter.app; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('llm_backend', 'export', 'stack', 'torch', "
            "'transformers', 'onnxruntime', 'httpx')); print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _sampled(**fields):
    from openai_adapter.schemas import ChatCompletionRequest
    from openai_adapter.serving import sampling
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], **fields)
    return sampling(req, "m", "prompt", None, "rid")


def test_top_p_zero_is_greedy_not_the_engines_unset():
    # OpenAI's top_p=0 keeps only the most likely token; the model reads a 0 as "unset"
    # (TensorRT-LLM convention) and would sample from the whole vocabulary.
    g = _sampled(top_p=0, temperature=1)
    assert g.top_k == 1 and g.top_p is None


def test_top_k_minus_one_means_no_top_k():
    # vLLM clients send top_k=-1 for "disabled"; the model only knows 0 for that.
    g = _sampled(top_k=-1)
    assert g.top_k is None
    assert _sampled(top_k=5).top_k == 5
