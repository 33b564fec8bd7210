"""CPU kernels of our own, loaded into onnxruntime as a custom-op library.

`library()` compiles `*.c` here with the machine's gcc (`-O3 -march=native`) into a
cache, once per source and CPU; `fuse_row_quantize(graph)` rewrites a W8A8 graph to use
them. Both are optional: without gcc, or where the build fails, the engine serves the
graph as exported (the same numbers, more nodes), and says why in its log.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger("llm_backend")

DOMAIN = "llm.kernels"
SOURCES = Path(__file__).parent
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-Wall", "-fPIC", "-fvisibility=hidden"]
# Per source, on top of FLAGS. -ffast-math is for compiling only: linked with it, gcc adds
# code that turns on flush-to-zero for the whole process. RowQuantize must not have it
# (it divides exactly as onnxruntime does).
SOURCE_FLAGS = {"group_attention.c": ["-ffast-math"]}

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    base = os.environ.get("LLM_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llm-kernels")
    try:
        Path(base).mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return Path(base)
    except OSError:
        pass
    return Path(tempfile.gettempdir())


_built: dict[str, Path | None] = {}


def library() -> Path | None:
    """The compiled library (built on first use; cached by source, flags and CPU), or None
    when it cannot be built here (the reason is logged)."""
    sources = sorted(SOURCES.glob("*.c"))
    digest = hashlib.sha256()
    for p in sorted(SOURCES.glob("*.[ch]")):
        digest.update(p.name.encode() + p.read_bytes())
    digest.update(" ".join(FLAGS).encode() + _cpu_model().encode())
    key = digest.hexdigest()[:16]
    if key in _built:
        return _built[key]
    lib = _cache_dir() / f"llm-kernels-{key}.so"
    if not lib.is_file():
        try:
            with tempfile.TemporaryDirectory(dir=lib.parent, prefix=".build-") as tmp:
                objects = []
                for src in sources:
                    obj = Path(tmp) / f"{src.stem}.o"
                    subprocess.run(["gcc", *FLAGS, *SOURCE_FLAGS.get(src.name, []), "-c", str(src), "-o", str(obj)],
                                   check=True, capture_output=True, text=True, timeout=120)
                    objects.append(str(obj))
                built = Path(tmp) / lib.name
                subprocess.run(["gcc", "-shared", *objects, "-o", str(built), "-lm"],
                               check=True, capture_output=True, text=True, timeout=120)
                os.replace(built, lib)   # atomic: a concurrent load sees the whole file or none
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", "") or err
            log.warning("cpu kernels: cannot build %s (%s); serving the graph as exported", lib.name, detail)
            _built[key] = None
            return None
    _built[key] = lib
    return lib


def ops(lib: Path) -> set[str]:
    """The ops the library registers on this CPU (GroupAttention needs AVX-512)."""
    import ctypes

    fn = ctypes.CDLL(str(lib)).llm_kernel_ops
    fn.restype = ctypes.c_char_p
    return set(filter(None, fn().decode().split(",")))


def fuse_row_quantize(graph) -> int:
    """Replace each W8A8 activation quantization (Abs, ReduceMax over the last axis,
    Div, QuantizeLinear with scale 1/127 and zero point 128; export/w8a8.py) by one
    RowQuantize node with the same two results; returns how many were replaced.
    Chains whose intermediate results are read elsewhere, or whose constants differ,
    are left alone."""
    from onnx import TensorProto, helper, numpy_helper

    # the scalar and axes constants, stored in the graph (weights stay in their file)
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer
              if t.data_location != TensorProto.EXTERNAL and int(np.prod(t.dims)) <= 1}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    graph_outputs = {o.name for o in graph.output}

    def const(name, value, dtype) -> bool:
        arr = consts.get(name)
        return arr is not None and arr.dtype == dtype and arr.size == 1 and arr.reshape(()) == value

    replace: dict[int, object] = {}
    drop: set[int] = set()
    for quant in graph.node:
        if quant.op_type != "QuantizeLinear" or len(quant.input) != 3:
            continue
        div = producer.get(quant.input[0])
        rmax = producer.get(div.input[1]) if div is not None and div.op_type == "Div" else None
        absn = producer.get(rmax.input[0]) if rmax is not None and rmax.op_type == "ReduceMax" else None
        if absn is None or absn.op_type != "Abs" or absn.input[0] != div.input[0] or len(rmax.input) != 2:
            continue
        keepdims = next((a.i for a in rmax.attribute if a.name == "keepdims"), 1)
        axes = consts.get(rmax.input[1])
        if (keepdims != 1 or axes is None or axes.tolist() != [-1]
                or not const(quant.input[1], np.float32(1 / 127), np.float32)
                or not const(quant.input[2], 128, np.uint8)
                or readers.get(absn.output[0]) != 1 or readers.get(div.output[0]) != 1
                or {absn.output[0], div.output[0]} & graph_outputs):
            continue
        fused = helper.make_node("RowQuantize", [absn.input[0]], [quant.output[0], rmax.output[0]],
                                 domain=DOMAIN, name=f"{quant.name}/RowQuantize")
        replace[id(quant)] = fused
        drop.update({id(absn), id(rmax), id(div)})
    if not replace:
        return 0
    nodes = [replace.get(id(n), n) for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(nodes)
    # the axes and the 1/127 the removed nodes read, when nothing else does
    read = {i for n in graph.node for i in n.input}
    unread = [t for t in graph.initializer if t.name in consts and t.name not in read]
    for t in unread:
        graph.initializer.remove(t)
    return len(replace)


# GroupQueryAttention's attributes GroupAttention computes the same way (value: the ones it takes)
_GQA_ATTRIBUTES = {"num_heads": None, "kv_num_heads": None, "scale": None, "do_rotary": {1},
                   "rotary_interleaved": {0}, "local_window_size": {-1}, "softcap": {0.0},
                   "smooth_softmax": {0}, "qk_output": {0}}


def use_group_attention(graph, head_size: int = 64, max_group: int = 4) -> int:
    """Replace each GroupQueryAttention node that GroupAttention computes the same way
    (packed QKV, rotary on q and k by half-rotation, fp32 KV, no window, softcap, bias or
    sinks; heads of 64, at most 4 query heads per key-value head) by a GroupAttention
    node; returns how many were replaced. Others are left alone."""
    from onnx import TensorProto, helper

    float_inputs = {i.name for i in graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT}
    cos_dims = {t.name: list(t.dims) for t in graph.initializer}
    replaced = 0
    for i, node in enumerate(graph.node):
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ins = list(node.input) + [""] * (12 - len(node.input))
        heads, kv_heads = attrs.get("num_heads", 0), attrs.get("kv_num_heads", 0)
        if (any(k not in _GQA_ATTRIBUTES or (_GQA_ATTRIBUTES[k] is not None and v not in _GQA_ATTRIBUTES[k])
                for k, v in attrs.items())
                or attrs.get("do_rotary") != 1 or ins[1] or ins[2] or any(ins[9:])
                or not (ins[3] in float_inputs and ins[4] in float_inputs)
                or cos_dims.get(ins[7], [0, 0])[1] * 2 != head_size or cos_dims.get(ins[8]) != cos_dims.get(ins[7])
                or not kv_heads or heads % kv_heads or heads // kv_heads > max_group):
            continue
        node_attrs = {"scale": float(attrs["scale"])} if attrs.get("scale") else {}
        graph.node[i].CopyFrom(helper.make_node(
            "GroupAttention", [ins[0], ins[3], ins[4], ins[5], ins[6], ins[7], ins[8]], list(node.output),
            domain=DOMAIN, name=f"{node.name}/GroupAttention", **node_attrs))
        replaced += 1
    return replaced
