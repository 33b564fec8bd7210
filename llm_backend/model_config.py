"""The model-directory contract between `llm-export` and the `llm` backend.

One place defines the tensors the model speaks, the engine parameters it reads
from `config.pbtxt`, and how that file is written. `llm-export` renders it; the
backend parses the same parameter names back in `initialize`; the OpenAI adapter
reads `chat_template` and the token limits through Triton's model-config API.

Pure Python, no third-party imports: the exporter and tests import it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKEND_NAME = "llm"

# Tensor schema of TensorRT-LLM-style models, so Triton's OpenAI frontend,
# genai-perf and perf_analyzer drive ours unchanged. max_batch_size > 0 gives each
# tensor a leading batch dimension of 1 ([[prompt]]), as those tools send.
# (name, Triton data type, dims, optional)
INPUTS: list[tuple[str, str, list[int], bool]] = [
    ("text_input", "TYPE_STRING", [1], True),         # required unless input_ids is given
    ("input_ids", "TYPE_INT64", [-1], True),          # pre-tokenized prompt
    ("max_tokens", "TYPE_INT32", [1], True),
    ("stream", "TYPE_BOOL", [1], True),
    ("stop_words", "TYPE_STRING", [-1], True),
    ("temperature", "TYPE_FP32", [1], True),
    ("top_p", "TYPE_FP32", [1], True),
    ("top_k", "TYPE_INT32", [1], True),
    ("seed", "TYPE_UINT64", [1], True),
    ("random_seed", "TYPE_UINT64", [1], True),        # TensorRT-LLM's name for seed
    ("presence_penalty", "TYPE_FP32", [1], True),
    ("frequency_penalty", "TYPE_FP32", [1], True),
    ("exclude_input_in_output", "TYPE_BOOL", [1], True),
    ("return_num_input_tokens", "TYPE_BOOL", [1], True),
    ("return_num_output_tokens", "TYPE_BOOL", [1], True),
    ("return_log_probs", "TYPE_BOOL", [1], True),
    ("ignore_eos", "TYPE_BOOL", [1], True),
]

OUTPUTS: list[tuple[str, str, list[int]]] = [
    ("text_output", "TYPE_STRING", [-1]),
    ("num_input_tokens", "TYPE_INT32", [1]),
    ("num_output_tokens", "TYPE_INT32", [1]),
    ("finish_reason", "TYPE_STRING", [1]),            # "stop" | "length" on the last response
    ("output_log_probs", "TYPE_FP32", [-1]),          # log-prob of each token in this response
]


@dataclass
class EngineParams:
    """Engine settings written into config.pbtxt `parameters` (all as strings there)."""

    onnx_model: str = "model.onnx"         # relative to the version directory
    precision: str = "fp32"                # fp32 | w8a8 | int4 | fp16 | int8
    device: str = "cpu"                    # cpu | cuda (execution provider)
    max_num_seqs: int = 16                 # sequences decoded together (KV slots)
    max_model_len: int = 2048              # prompt + generated tokens per sequence
    kv_cache_mb: int = 0                   # CPU KV budget; 0 = max_num_seqs * max_model_len
    kv_cache_dtype: str = "auto"           # CPU KV: float16 | float32 | auto (float16 for quantized weights,
                                           # float32 for fp32 ones); float16 needs our attention kernel
    kv_cache_gpu_fraction: float = 0.5     # GPU: fraction of free device memory for KV
    max_queue_size: int = 64               # requests waiting for a slot; beyond -> UNAVAILABLE
    prefill_chunk: int = 128               # prompt tokens per engine step (interleaved with decode)
    max_prefill_batch: int = 8             # new prompts prefilled together in one call at most; 1: one a call
    prefix_cache_mb: int = 64              # prompt (prefix) cache; 0 disables
    stream_interval: int = 4               # tokens per streamed response after the first (vLLM's, SGLang's
                                           # option; held at most 0.2 s): each response costs Triton, the
                                           # adapter and the client CPU; 1 streams every token (docs/engine.md)
    intra_op_threads: int = 0              # 0 = number of cores
    ort_allow_spinning: int = 1            # 1: onnxruntime workers spin between ops (dedicated cores); 0: shared machine
    cpu_kernels: int = 1                   # 1: our own CPU kernels (llm_backend/cpu_ops, built with gcc at load)
                                           # where they build; 0: the graph as exported (same numbers)
    packed_decode: int = 1                 # with cpu_kernels: 1: a decode step alone reads the W8A8 weights
                                           # packed (NibbleMatMul, same numbers); 0: onnxruntime's int8 GEMM
    chat_template: str = ""                # the checkpoint's own Jinja chat template
    bos_token: str = ""
    eos_token: str = ""
    context_length: int = 0                # the model's max_position_embeddings

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "EngineParams":
        """Parse Triton's `parameters` map ({key: {"string_value": v}} or {key: v})."""
        out = cls()
        for key, default in cls().__dict__.items():
            if key not in params:
                continue
            raw = params[key]
            if isinstance(raw, dict):
                raw = raw.get("string_value", "")
            try:
                setattr(out, key, type(default)(raw))
            except ValueError as err:
                raise ValueError(f"config.pbtxt parameter {key!r}: cannot read {raw!r} as {type(default).__name__}") from err
        return out


def _pbtxt_string(value: str) -> str:
    """Quote a string for protobuf text format (UTF-8 passes through)."""
    escaped = (value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
               .replace("\r", "\\r").replace("\t", "\\t"))
    return f'"{escaped}"'


def render_config_pbtxt(name: str, params: EngineParams, *, instance_kind: str = "KIND_CPU",
                        instance_count: int = 1, max_batch_size: int = 64,
                        max_queue_delay_us: int = 1000, triton_queue_size: int = 256) -> str:
    """The whole config.pbtxt of an exported model."""
    lines = [
        f"name: {_pbtxt_string(name)}",
        f"backend: {_pbtxt_string(BACKEND_NAME)}",
        f"max_batch_size: {max_batch_size}",
        "model_transaction_policy { decoupled: true }",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        f"  default_queue_policy {{ max_queue_size: {triton_queue_size} }}",
        "}",
        "input [",
    ]
    lines += [",\n".join(
        f"  {{ name: {_pbtxt_string(n)} data_type: {t} dims: {d} optional: {'true' if opt else 'false'} }}"
        for n, t, d, opt in INPUTS)]
    lines += ["]", "output ["]
    lines += [",\n".join(f"  {{ name: {_pbtxt_string(n)} data_type: {t} dims: {d} }}" for n, t, d in OUTPUTS)]
    lines += ["]", f"instance_group [ {{ count: {instance_count} kind: {instance_kind} }} ]", "parameters ["]
    lines += [",\n".join(
        f"  {{ key: {_pbtxt_string(k)} value: {{ string_value: {_pbtxt_string(str(v))} }} }}"
        for k, v in params.__dict__.items())]
    lines += ["]", ""]
    return "\n".join(lines)
