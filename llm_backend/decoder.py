"""The decoder: one onnxruntime session over the builder's ONNX model, with a shared
KV buffer of one slot (row) per sequence, bound in place through io_binding.

The builder's `GroupQueryAttention` takes each row's length from the attention mask
and writes the new keys/values into the bound past buffer at that position
(`past_present_share_buffer`), so nothing is concatenated or copied per step:
binding the same memory as `past_key_values.L.x` and `present.L.x` is enough.

Rows `[0, n)` are decoded together in one call; the KV cache manager
(kv_cache_manager.py) keeps the rows being decoded packed at the front (`move_row` on
departure). Importable without Triton. The measurements behind the choices made here
are in docs/engine.md ("The decoder").
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cpu_ops import DOMAIN as CPU_KERNEL_DOMAIN
from .cpu_ops import fuse_row_quantize, fuse_skip_norm_quantize, fuse_swiglu, use_group_attention, use_nibble_matmul
from .cpu_ops import library as cpu_library
from .cpu_ops import ops as cpu_library_ops

log = logging.getLogger(__name__)

LAST_INDEX = "llm_last_index"   # the graph input prepare_graph adds: the position whose logits each row returns


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:
        return os.cpu_count() or 1


class ModelLoadError(RuntimeError):
    """The model directory's artifacts are missing, unreadable or inconsistent."""


# CPU features with an exact 8-bit dot product (32-bit accumulation).
VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


def int8_gemm_is_exact(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Can onnxruntime's u8s8 GEMM (W8A8 exports) run exactly on this CPU?

    On x86 without VNNI, MLAS multiplies with `vpmaddubsw`, whose 16-bit sums of
    product pairs saturate for full-range 8-bit weights: the results would be silently
    wrong (onnxruntime's quantization docs: use 7-bit weights there; on SmolLM2 that
    moved the next-token distribution by 0.3 nats, so we refuse instead). ARM's
    dot-product instructions accumulate in 32 bits. Unknown: assumed exact."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        with open(cpuinfo) as f:
            line = next((line for line in f if line.startswith("flags")), None)
    except OSError:
        return True
    return line is None or bool(set(line.split(":", 1)[1].split()) & VNNI_FLAGS)


# Weight formats whose rounding is far above float16's (W8A8, 4-bit)
QUANTIZED_OPS = {"MatMulIntegerToFloat", "MatMulNBits", "DynamicQuantizeMatMul", "MatMulInteger"}
KV_CACHE_DTYPES = ("auto", "float16", "float32")


def kv_half_wanted(kv_cache_dtype: str, op_types: set[str]) -> bool:
    """config.pbtxt `kv_cache_dtype`: "float16", "float32", or "auto": float16 for
    quantized weights (its rounding is far below theirs: the W8A8 export's mean KL to the
    fp32 one went from 0.0489 to 0.0511 nats, docs/engine.md), float32 for an fp32 export
    (whose greedy output is held identical to transformers'). llama.cpp's KV is float16
    by default too."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ModelLoadError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    if kv_cache_dtype == "auto":
        return bool(op_types & QUANTIZED_OPS)
    return kv_cache_dtype == "float16"


def slots_in_budget(wanted: int, kv_cache_mb: int, row_bytes: int, max_len: int) -> int:
    """KV slots of `row_bytes` (a sequence of `max_len` tokens) that `kv_cache_mb` holds,
    at most `wanted`; all `wanted` when the budget is 0 (none set)."""
    if kv_cache_mb <= 0:
        return wanted
    fit = kv_cache_mb * 2**20 // row_bytes
    if fit < 1:
        raise ModelLoadError(f"kv_cache_mb={kv_cache_mb} holds no sequence of max_model_len="
                             f"{max_len} tokens ({row_bytes / 2**20:.1f} MB each)")
    return min(wanted, fit)


def graph_op_types(onnx_path: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(onnx_path), load_external_data=False).graph.node}


def _head_input(graph) -> tuple[str, object] | None:
    """(hidden-state tensor the LM head reads, the node producing it), or None.

    Walks back from `logits` along first inputs to the final norm: the head is one
    MatMul / MatMulNBits in builder graphs, a small subgraph in W8A8 ones."""
    producer = {o: n for n in graph.node for o in n.output}
    node = producer.get("logits")
    for _ in range(8):
        if node is None or not node.input:
            return None
        source = producer.get(node.input[0])
        if source is not None and source.op_type.endswith("LayerNormalization"):
            return node.input[0], source
        node = source
    return None


def _pick_last_position(model) -> bool:
    """prepare_graph's step 1, in place; False (the graph unchanged) where the head's input
    is not found."""
    import onnx
    from onnx import helper

    g = model.graph
    found = _head_input(g)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if found is None or opset < 13:   # Unsqueeze with its axes as an input
        return False
    hidden, norm = found
    # hidden [rows, positions, width] -> [rows, 1, width] at llm_last_index[row]
    g.input.append(helper.make_tensor_value_info(LAST_INDEX, onnx.TensorProto.INT64, ["batch_size"]))
    g.initializer.append(helper.make_tensor("llm_last/axis", onnx.TensorProto.INT64, [1], [1]))
    picked = "llm_last/hidden"
    for node in g.node:
        for i, name in enumerate(node.input):
            if name == hidden:
                node.input[i] = picked
    at = list(g.node).index(norm) + 1
    for i, node in enumerate([
        helper.make_node("Unsqueeze", [LAST_INDEX, "llm_last/axis"], ["llm_last/index"], name="llm_last/Unsqueeze"),
        helper.make_node("GatherND", [hidden, "llm_last/index"], ["llm_last/row"], batch_dims=1,
                         name="llm_last/GatherND"),
        helper.make_node("Unsqueeze", ["llm_last/row", "llm_last/axis"], [picked], name="llm_last/Position"),
    ]):
        g.node.insert(at + i, node)
    return True


def prepare_graph(onnx_path: Path, prefill_variant: bool, cpu_kernels: frozenset[str] = frozenset(),
                  head_size: int = 0, kernel_library: Path | None = None,
                  kv_half: bool = False) -> tuple[bytes | str, bytes | None]:
    """(graph for decoding, graph for prefill or None when the same will do).

    1. LM head on one position per row only. The builder's graph computes logits for
       every prompt position, though a prefill needs only the last (for a long prompt a
       large share of the compute, and a large output). We gather the final norm's
       output at the position the new input `llm_last_index` names for each row (the
       last one, or a right-padded row's last real one in a batched prefill) before the
       head. The graph is edited in memory; the weights stay where they are.
    2. For 4-bit exports (`MatMulNBits` with accuracy_level 4: int8 activations), a
       prefill copy with accuracy_level 0 (fp32 compute on dequantized blocks): prefill
       is faster with it, single-row decode with int8 activations, so each kind of call
       uses its own session.
    3. With `cpu_kernels`, the ops of our own library that may be used (CPU only; the
       caller registers `cpu_ops.library()`): each W8A8 activation quantization (four
       nodes) becomes one `RowQuantize` node that computes the same bytes
       (`cpu_ops.fuse_row_quantize`); each MLP gate after W8A8's gate-and-up product
       (the product's row scale, Split, Sigmoid and two Muls) becomes one `SwiGLU` node
       (`cpu_ops.fuse_swiglu`; the same within float rounding); a product's row scale,
       the residual's norm and the next quantization become one `SkipNormQuantize`
       (`cpu_ops.fuse_skip_norm_quantize`; the same bytes); `GroupQueryAttention`
       becomes `GroupAttention`,
       which reads each key-value head's keys and values once for all its query heads
       (`cpu_ops.use_group_attention`; the same attention within float rounding), and
       with `kv_half` keeps them in float16 (the graph's KV inputs and outputs too).
       Calls of one row and one position (a decode step alone) then get a branch of
       their own, whose W8A8 products read weights that fit it (a 4-bit checkpoint's)
       as 4-bit codes into per-block tables, NibbleMatMul: the same logits bit for bit
       from a third fewer bytes (`cpu_ops.use_nibble_matmul`; needs `kernel_library`).
    Falls back to the file unchanged when none of these applies.
    """
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    g = model.graph
    sliced = _pick_last_position(model)
    fused = fuse_row_quantize(g) if "RowQuantize" in cpu_kernels else 0
    gates = fuse_swiglu(g) if "SwiGLU" in cpu_kernels and fused else 0   # reads RowQuantize's scale
    norms = fuse_skip_norm_quantize(g) if "SkipNormQuantize" in cpu_kernels and fused else 0
    attention = use_group_attention(g, head_size, kv_half=kv_half) if "GroupAttention" in cpu_kernels else 0
    nibble = (use_nibble_matmul(model, kernel_library, Path(onnx_path).parent)
              if "NibbleMatMul" in cpu_kernels and kernel_library is not None else 0)
    if fused or attention or nibble:
        model.opset_import.append(helper.make_opsetid(CPU_KERNEL_DOMAIN, 1))
        log.info("decoder: our CPU kernels: %d RowQuantize nodes (each for four), %d SwiGLU nodes (each for five), "
                 "%d SkipNormQuantize nodes (each for three), %d GroupAttention nodes, %d NibbleMatMul products "
                 "for one row", fused - norms, gates, norms, attention, nibble)
    elif not sliced:
        return str(onnx_path), None
    decode = model.SerializeToString()
    levels = [a for n in g.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"]
    if not prefill_variant or not any(a.i != 0 for a in levels):
        return decode, None
    for a in levels:
        a.i = 0
    return decode, model.SerializeToString()


@dataclass
class DecoderSpec:
    num_layers: int
    kv_heads: int
    head_size: int
    vocab_size: int
    context_length: int
    eos_token_ids: list[int]
    bos_token_id: int | None
    key_names: str = "past_key_values.%d.key"
    value_names: str = "past_key_values.%d.value"
    present_key_names: str = "present.%d.key"
    present_value_names: str = "present.%d.value"

    @classmethod
    def from_genai_config(cls, path: Path) -> "DecoderSpec":
        try:
            cfg = json.loads(Path(path).read_text())
            m = cfg["model"]
            dec = m["decoder"]
            eos = m.get("eos_token_id", [])
            eos = list(eos) if isinstance(eos, list) else [eos]
            return cls(
                num_layers=int(dec["num_hidden_layers"]),
                kv_heads=int(dec["num_key_value_heads"]),
                head_size=int(dec["head_size"]),
                vocab_size=int(m["vocab_size"]),
                context_length=int(m.get("context_length", 0)),
                eos_token_ids=[int(e) for e in eos],
                bos_token_id=m.get("bos_token_id"),
                key_names=dec.get("inputs", {}).get("past_key_names", cls.key_names),
                value_names=dec.get("inputs", {}).get("past_value_names", cls.value_names),
                present_key_names=dec.get("outputs", {}).get("present_key_names", cls.present_key_names),
                present_value_names=dec.get("outputs", {}).get("present_value_names", cls.present_value_names),
            )
        except FileNotFoundError as err:
            raise ModelLoadError(f"missing {path.name} in {path.parent}") from err
        except (ValueError, KeyError, TypeError) as err:
            raise ModelLoadError(f"cannot read {path}: {err!r}") from err

    def row_bytes(self, max_len: int, itemsize: int = 4) -> int:
        """KV bytes of one slot (all layers, keys and values)."""
        return self.num_layers * 2 * self.kv_heads * max_len * self.head_size * itemsize


class Decoder:
    """Session + KV slots. Not thread-safe: one engine thread drives it."""

    def __init__(self, model_dir: Path, onnx_model: str = "model.onnx", *, num_slots: int,
                 max_len: int, device: str = "cpu", intra_op_threads: int = 0,
                 kv_cache_gpu_fraction: float = 0.5, kv_cache_mb: int = 0, allow_spinning: bool = True,
                 cpu_kernels: bool = True, packed_decode: bool = True, kv_cache_dtype: str = "auto"):
        import onnxruntime as ort

        model_dir = Path(model_dir)
        self.spec = DecoderSpec.from_genai_config(model_dir / "genai_config.json")
        onnx_path = model_dir / onnx_model
        if not onnx_path.is_file():
            raise ModelLoadError(f"missing ONNX model {onnx_path}")
        self.device = device
        self.kernel_library = None   # our CPU kernels' library (cpu_ops/), when loaded
        try:
            op_types = graph_op_types(onnx_path)
        except Exception as err:  # onnx raises protobuf's own errors for a file that is not a model
            raise ModelLoadError(f"onnxruntime cannot load {onnx_path}: {err!r}") from err
        kv_half = kv_half_wanted(kv_cache_dtype, op_types)   # on the CPU, where our attention kernel runs
        if device == "cpu" and not int8_gemm_is_exact() and "MatMulIntegerToFloat" in op_types:
            raise ModelLoadError(f"{onnx_path} is a W8A8 export, and this CPU has no VNNI (AVX512-VNNI, "
                                 "AVX-VNNI or AMX): onnxruntime's int8 GEMM would saturate and give wrong "
                                 "results here. Serve an int4 or fp32 export on this machine.")
        threads = intra_op_threads or cpu_count()
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads   # explicit: onnxruntime's default was slower
        so.inter_op_num_threads = 1
        # Spin-waiting of the intra-op workers: faster on dedicated cores, much slower when
        # other processes compete for the cores: a config.pbtxt knob.
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if device == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        elif device == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise ModelLoadError(f"device must be cpu or cuda, got {device!r}")
        try:
            # weights of a graph loaded from memory are found relative to this folder
            so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                        str(onnx_path.resolve().parent))
            # our own CPU kernels (cpu_ops/): None where they cannot be built
            kernel_ops = self._load_kernels(so) if cpu_kernels and device == "cpu" else frozenset()
            if not packed_decode:   # decode steps alone as every call (config.pbtxt `packed_decode`)
                kernel_ops -= {"NibbleMatMul"}
            decode_graph, prefill_graph = prepare_graph(onnx_path, prefill_variant=device == "cpu",
                                                        cpu_kernels=kernel_ops, head_size=self.spec.head_size,
                                                        kernel_library=self.kernel_library, kv_half=kv_half)
            try:
                self.session = ort.InferenceSession(decode_graph, so, providers=providers)
            except Exception as err:  # noqa: BLE001 - our kernels' graph refused: serve it as exported
                if not kernel_ops:
                    raise
                log.warning("cpu kernels: onnxruntime refused the graph with them (%s); serving it as exported", err)
                self.kernel_library = None
                decode_graph, prefill_graph = prepare_graph(onnx_path, prefill_variant=True)
                self.session = ort.InferenceSession(decode_graph, so, providers=providers)
            if prefill_graph is not None:
                # large prefill GEMMs ran faster without spinning
                so.add_session_config_entry("session.intra_op.allow_spinning", "0")
                self.prefill_session = ort.InferenceSession(prefill_graph, so, providers=providers)
            else:
                self.prefill_session = self.session
        except Exception as err:  # onnx/onnxruntime raise their own exception types
            raise ModelLoadError(f"onnxruntime cannot load {onnx_path}: {err}") from err
        if device == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise ModelLoadError("device is cuda but onnxruntime has no CUDAExecutionProvider")
        names = {i.name for i in self.session.get_inputs()}
        needed = {"input_ids", "attention_mask", self.spec.key_names % 0}
        if not needed <= names:
            raise ModelLoadError(f"{onnx_path.name} lacks inputs {sorted(needed - names)}")
        logits = next((o for o in self.session.get_outputs() if o.name == "logits"), None)
        if logits is None:
            raise ModelLoadError(f"{onnx_path.name} has no 'logits' output")
        self.threads = threads
        self.max_len = max_len
        sp = self.spec
        self.row_shape = (sp.kv_heads, max_len, sp.head_size)
        # KV element type: what the graph's past inputs take (fp16 for GPU exports)
        past_type = next(i.type for i in self.session.get_inputs() if i.name == sp.key_names % 0)
        self.kv_dtype = np.float16 if past_type == "tensor(float16)" else np.float32
        self.row_bytes = sp.row_bytes(max_len, np.dtype(self.kv_dtype).itemsize)
        if device == "cuda":
            num_slots = self._gpu_slots(num_slots, kv_cache_gpu_fraction)
        else:
            num_slots = slots_in_budget(num_slots, kv_cache_mb, self.row_bytes, max_len)
        self.num_slots = num_slots
        self._alloc(num_slots)
        self._bindings: dict[tuple[int, int, int], object] = {}
        # With the last-position slice the logits are [rows, 1, vocab]: written into one
        # preallocated buffer, bound once: fetching them through get_outputs() wrapped all
        # 61 outputs in Python objects every step.
        self._logits_out = None
        if device == "cpu" and LAST_INDEX in names and logits.type == "tensor(float)":
            self._logits_out = np.empty((num_slots, 1, sp.vocab_size), dtype=np.float32)
        # Logits of one position per row (prepare_graph): several prompts can then be
        # prefilled in one call, right-padded to the longest (`prefill_batch`). Not with
        # a prefill graph of its own (4-bit exports): it computes in fp32 on dequantized
        # blocks, whose sums depend on the batch (logits ~3e-5 apart, measured), and a
        # request's first token must come from its prompt alone, whatever else runs.
        self._picks_position = LAST_INDEX in names
        self.batched_prefill = self._picks_position and self.prefill_session is self.session
        log.info("decoder: %s, %d layers, %d slots x %d tokens (%.0f MB KV, %s), %d threads, %s",
                 onnx_path, sp.num_layers, num_slots, max_len, num_slots * self.row_bytes / 2**20,
                 np.dtype(self.kv_dtype).name, threads, self.session.get_providers()[0])
        if "NibbleMatMul" in kernel_ops:
            self._warm_up()

    def _warm_up(self) -> None:
        """One decode step alone on row 0 (its KV is written before it is read again):
        NibbleMatMul repacks its weights on its first call (~0.25 s for the default model),
        better at load than in a request's first token."""
        t0 = time.perf_counter()
        try:
            self.decode(np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64))
        except Exception as err:  # noqa: BLE001 - a model that fails here fails its requests with the reason
            log.warning("decoder: the warm-up step failed: %s", err)
            return
        log.info("decoder: warm-up step (one row) %.0f ms", 1e3 * (time.perf_counter() - t0))

    def _load_kernels(self, so) -> frozenset[str]:
        """Register our CPU kernels (cpu_ops/) with the session options; the ops usable,
        none where the library is missing or does not load (logged)."""
        self.kernel_library = cpu_library()
        if self.kernel_library is None:
            return frozenset()
        try:
            ops = frozenset(cpu_library_ops(self.kernel_library))
            so.register_custom_ops_library(str(self.kernel_library))
            return ops
        except Exception as err:  # noqa: BLE001 - ctypes and onnxruntime raise their own types
            log.warning("cpu kernels: cannot load %s (%s); serving the graph as exported", self.kernel_library, err)
            self.kernel_library = None
            return frozenset()

    # -- memory ---------------------------------------------------------------------------
    def _gpu_slots(self, wanted: int, fraction: float) -> int:
        """GPU: KV slots that fit in `fraction` of the free device memory (untested here)."""
        import torch  # the CUDA path keeps the KV buffers as torch device tensors

        free, _total = torch.cuda.mem_get_info(0)
        fit = int(free * fraction // self.row_bytes)
        if fit < 1:
            raise ModelLoadError(f"kv_cache_gpu_fraction={fraction} of {free >> 20} MB free "
                                 f"holds no slot of {self.row_bytes >> 20} MB")
        return min(wanted, fit)

    def _alloc(self, n: int) -> None:
        sp = self.spec
        shape = (n, *self.row_shape)
        if self.device == "cuda":
            import torch
            tdtype = torch.float16 if self.kv_dtype == np.float16 else torch.float32
            self.kv = [[torch.zeros(shape, dtype=tdtype, device="cuda") for _ in range(2)]
                       for _ in range(sp.num_layers)]
            self._sync()   # the zeros are written on torch's stream; onnxruntime reads on its own
        else:
            # np.zeros maps untouched pages lazily: memory is used as sequences grow.
            self.kv = [[np.zeros(shape, dtype=self.kv_dtype) for _ in range(2)]
                       for _ in range(sp.num_layers)]

    def _ptr(self, buf, row: int) -> int:
        base = buf.data_ptr() if self.device == "cuda" else buf.ctypes.data
        return base + row * (self.row_bytes // (self.spec.num_layers * 2))

    # -- the two calls --------------------------------------------------------------------
    def _bind_kv(self, binding, first: int, count: int) -> None:
        sp = self.spec
        shape = [count, *self.row_shape]
        for layer in range(sp.num_layers):
            for kind, (past, present) in enumerate(((sp.key_names, sp.present_key_names),
                                                    (sp.value_names, sp.present_value_names))):
                ptr = self._ptr(self.kv[layer][kind], first)
                binding.bind_input(past % layer, self.device, 0, self.kv_dtype, shape, ptr)
                binding.bind_output(present % layer, self.device, 0, self.kv_dtype, shape, ptr)

    def _run(self, input_ids: np.ndarray, mask: np.ndarray, first: int, count: int,
             session=None, last: np.ndarray | None = None) -> np.ndarray:
        """`last`: the position each row returns logits for (default: the last one)."""
        session = session or self.session
        # One binding per (session, rows): the KV pointers never move, and binding the
        # 2 x layers buffers anew every step was a visible share of a one-row decode.
        key = (id(session), first, count)
        binding = self._bindings.get(key)
        if binding is None:
            binding = session.io_binding()
            if self._logits_out is not None:
                out = self._logits_out[:count]
                binding.bind_output("logits", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
            else:
                binding.bind_output("logits", "cpu")  # first: outputs return in binding order
            self._bind_kv(binding, first, count)
            self._bindings[key] = binding
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", mask)
        if self._picks_position:
            if last is None:
                last = np.full(count, input_ids.shape[1] - 1, dtype=np.int64)
            binding.bind_cpu_input(LAST_INDEX, last)
        session.run_with_iobinding(binding)
        if self._logits_out is not None:
            logits = self._logits_out[:count].copy()   # callers keep logits across calls
        else:
            logits = np.array(binding.get_outputs()[0].numpy(), dtype=np.float32)   # a copy, fp32
            # Bound anew (same place in the order): otherwise onnxruntime would take this run's
            # logits as a preallocated output, fixing its shape and keeping it alive per binding.
            binding.bind_output("logits", "cpu")
        # Our kernels answer what they cannot compute with NaN (they cannot raise), and a
        # NaN anywhere in a row's hidden state reaches all its logits: one element a row
        # tells, and a request fails with the reason instead of sampling from NaN.
        nan = np.isnan(logits[:, -1, 0])
        if nan.any():
            raise RuntimeError(f"the model returned NaN logits (rows {np.flatnonzero(nan).tolist()} of this call)")
        return logits

    def prefill(self, row: int, tokens: list[int] | np.ndarray, past_len: int) -> np.ndarray:
        """Run `tokens` on row `row`, whose first `past_len` positions are already filled.
        Returns the logits of the last token, [vocab]."""
        n = len(tokens)
        if past_len + n > self.max_len:
            raise ValueError(f"row {row}: {past_len}+{n} exceeds {self.max_len}")
        ids = np.asarray(tokens, dtype=np.int64).reshape(1, n)
        mask = np.ones((1, past_len + n), dtype=np.int64)
        # Every prompt token goes through the prefill graph, however the prompt was split
        # (prefix-cache hit, chunk boundary): the decode graph's int8 activations give
        # other KV and logits (up to 0.8 apart), so a cached prompt changed the output.
        logits = self._run(ids, mask, row, 1, self.prefill_session)
        return logits[0, -1]

    def prefill_batch(self, first: int, prompts: list[list[int]]) -> np.ndarray:
        """Whole new prompts (nothing cached) on rows [first, first + len(prompts)) in one
        call, right-padded to the longest. Returns each one's last-token logits, [k, vocab].
        Rows do not mix: each row's KV and logits are those of its prompt alone (onnxruntime's
        attention takes each row's length from the mask; the padding's own KV lands past
        the row's length, where decoding overwrites it)."""
        if not self.batched_prefill:
            raise ValueError("no batched prefill for this graph (see batched_prefill): one prompt a call")
        k, width = len(prompts), max(len(p) for p in prompts)
        if width > self.max_len or min(len(p) for p in prompts) < 1:
            raise ValueError(f"prompts of {[len(p) for p in prompts]} tokens for rows of {self.max_len}")
        ids = np.zeros((k, width), dtype=np.int64)
        mask = np.zeros((k, width), dtype=np.int64)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = p
            mask[i, :len(p)] = 1
        last = np.array([len(p) - 1 for p in prompts], dtype=np.int64)
        return self._run(ids, mask, first, k, self.prefill_session, last)[:, -1]

    def decode(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """One step for rows [0, n): row i has `lengths[i]` positions filled and gets
        `tokens[i]`. Returns logits [n, vocab]."""
        n = len(tokens)
        width = int(lengths.max()) + 1
        mask = (np.arange(width)[None, :] <= lengths[:, None]).astype(np.int64)
        logits = self._run(np.asarray(tokens, dtype=np.int64).reshape(n, 1), mask, 0, n)
        return logits[:, -1]

    # -- rows -------------------------------------------------------------------------------
    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row `src` to row `dst`."""
        if src == dst or length <= 0:
            return
        for layer in self.kv:
            for buf in layer:
                buf[dst, :, :length] = buf[src, :, :length]
        self._sync()

    def _sync(self) -> None:
        """CUDA: torch copies run on torch's stream, onnxruntime's on its own: finish
        ours before the next session run reads the buffers."""
        if self.device == "cuda":
            import torch
            torch.cuda.synchronize()

    def read_rows(self, row: int, start: int, stop: int) -> np.ndarray:
        """KV of positions [start, stop) of a row: [layers, 2, kv_heads, stop-start, head]."""
        out = np.empty((self.spec.num_layers, 2, self.spec.kv_heads, stop - start, self.spec.head_size),
                       dtype=self.kv_dtype)
        for li, layer in enumerate(self.kv):
            for k, buf in enumerate(layer):
                part = buf[row, :, start:stop]
                out[li, k] = part.cpu().numpy() if self.device == "cuda" else part
        return out

    def write_rows(self, row: int, start: int, block: np.ndarray) -> None:
        """Inverse of read_rows."""
        stop = start + block.shape[3]
        for li, layer in enumerate(self.kv):
            for k, buf in enumerate(layer):
                if self.device == "cuda":
                    import torch
                    buf[row, :, start:stop] = torch.from_numpy(block[li, k]).to(buf.device)
                else:
                    buf[row, :, start:stop] = block[li, k]
        self._sync()
