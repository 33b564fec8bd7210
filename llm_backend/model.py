"""The `llm` Python-based backend: Triton's side of the engine, kept thin.

`initialize` reads the engine parameters from config.pbtxt and loads the engine (a
load error leaves the model not ready with the reason in the log); `execute` parses
each request and hands it to the engine thread, which sends the responses;
`finalize` drains what is in flight. Everything else lives in plain modules.
"""

import json
import logging
from pathlib import Path

import triton_python_backend_utils as pb_utils

from llm_backend.decoder import ModelLoadError
from llm_backend.error_kinds import CANCELLED, INTERNAL, TRITON_CODES, RequestError, prefixed
from llm_backend.metrics import TritonMetrics
from llm_backend.model_config import EngineParams
from llm_backend.protocol import ResponseSink, parse_request
from llm_backend.service import load_engine
from llm_backend.stub_env import check_stub_environment

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonSender:
    """protocol.Sender over a decoupled response sender."""

    def __init__(self, sender):
        self.sender = sender

    def send(self, outputs, final):
        if outputs is None:
            self.sender.send(flags=FINAL)
            return
        tensors = [pb_utils.Tensor(name, value) for name, value in outputs.items()]
        self.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if final else 0)

    def send_error(self, kind, message):
        if kind == CANCELLED or self.sender.is_cancelled():
            # The client is gone. An error response to a cancelled request is never
            # released and kept the model from unloading (30 s exit timeout, measured):
            # end it with the bare final flag, as vllm_backend does. Not only for our
            # own `cancelled`: the adapter cancels a request's sibling choices as soon as
            # one fails, often while the sibling's own over_capacity error is on its way.
            self.sender.send(flags=FINAL)
            return
        if kind not in TRITON_CODES:   # a bug; still end the request, as the 500 it is
            kind, message = INTERNAL, f"{kind}: {message}"
        # TritonError's codes are injected by the stub after import: looked up late.
        error = pb_utils.TritonError(prefixed(kind, message), getattr(pb_utils.TritonError, TRITON_CODES[kind]))
        self.sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)

    def is_cancelled(self):
        return self.sender.is_cancelled()


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class TritonPythonModel:
    def initialize(self, args):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        config = json.loads(args["model_config"])
        name, version = args["model_name"], args["model_version"]
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(f"model {name}: config.pbtxt must set "
                                                "model_transaction_policy { decoupled: true }")
        problem = check_stub_environment()
        if problem:
            pb_utils.Logger.log_error(f"model {name} version {version} cannot load: {problem}")
            raise pb_utils.TritonModelException(f"model {name} version {version} cannot load: {problem}")
        try:
            params = EngineParams.from_parameters(config.get("parameters", {}))
            version_dir = Path(args["model_repository"]) / version
            metrics = TritonMetrics(pb_utils, {"model": name, "version": version})
            self.engine, self.tokenizer = load_engine(version_dir, params, metrics)
        except (ModelLoadError, ValueError) as err:
            pb_utils.Logger.log_error(f"model {name} version {version} cannot load: {err}")
            raise pb_utils.TritonModelException(f"model {name} version {version} cannot load: {err}") from err
        pb_utils.Logger.log_info(f"model {name} version {version} ready: {params}")

    def execute(self, requests):
        for request in requests:
            sender = TritonSender(request.get_response_sender())
            try:
                req = parse_request(lambda n, r=request: _input(r, n), self.engine.vocab_size)
                self.engine.submit(req, ResponseSink(sender, req))   # tokenized by a worker
            except RequestError as err:
                sender.send_error(err.kind, err.message)
            except Exception as err:  # never leave a request without its final flag
                pb_utils.Logger.log_error(f"execute: {err!r}")
                sender.send_error(INTERNAL, "the request could not be queued")
        return None

    def finalize(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
