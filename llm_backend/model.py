"""Placeholder: echoes text_input once, decoupled. Replaced by the real engine."""
import json
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.cfg = json.loads(args["model_config"])

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            t = pb_utils.get_input_tensor_by_name(request, "text_input")
            text = t.as_numpy().reshape(-1)[0] if t is not None else b""
            out = pb_utils.Tensor("text_output", np.array([[text]], dtype=object))
            sender.send(pb_utils.InferenceResponse(output_tensors=[out]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
