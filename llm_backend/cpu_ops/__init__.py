"""CPU kernels of our own, loaded into onnxruntime as a custom-op library.

`library()` compiles `*.c` here with the machine's gcc (`-O3 -march=native`) into a
cache, once per source and CPU; where there is no compiler (the CPU image) it takes a
library built beforehand for an instruction set this CPU has, from `$LLM_KERNEL_DIR`
(`python -m llm_backend.cpu_ops prebuild DIR`, a stage of the Dockerfile).
`fuse_row_quantize`, `fuse_swiglu`, `fuse_skip_norm_quantize`, `use_group_attention` and
`use_nibble_matmul` rewrite a graph to use them. All of it is optional: without a library the engine serves the graph as
exported (the same numbers for RowQuantize, more nodes), and says why in its log. Standard library only
at import (the image's build stage has no numpy).
"""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger("llm_backend")

DOMAIN = "llm.kernels"
SOURCES = Path(__file__).parent
FLAGS = ["-O3", "-fno-math-errno", "-Wall", "-fPIC", "-fvisibility=hidden"]
# Per source, on top of FLAGS. -ffast-math is for compiling only: linked with it, gcc adds
# code that turns on flush-to-zero for the whole process. RowQuantize must not have it
# (it divides exactly as onnxruntime does), nor fused multiply-adds (SkipNormQuantize).
SOURCE_FLAGS = {"group_attention.c": ["-ffast-math"], "swiglu.c": ["-ffast-math"],
                "row_quantize.c": ["-ffp-contract=off"]}   # SkipNormQuantize rounds as onnxruntime
# Prebuilt libraries, best first: the instruction set and the CPU flags it needs.
# NibbleMatMul needs AVX-512 VNNI, which x86-64-v4 does not include.
_V4 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma", "bmi2"}
PREBUILT = {"x86-64-v4-vnni": _V4 | {"avx512_vnni"},
            "x86-64-v4": _V4,
            "x86-64-v3": {"avx2", "fma", "bmi2", "movbe"},
            "x86-64-v2": {"sse4_2", "popcnt"}}
MARCH_FLAGS = {"x86-64-v4-vnni": ["-march=x86-64-v4", "-mavx512vnni"]}   # others: -march=<name>


def _cpu_line(key: str) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line
    except OSError:
        pass
    return ""


def _source_key() -> str:
    digest = hashlib.sha256()
    for p in sorted(SOURCES.glob("*.[ch]")):
        digest.update(p.name.encode() + p.read_bytes())
    digest.update(repr((FLAGS, SOURCE_FLAGS)).encode())
    return digest.hexdigest()[:16]


def _cache_dir() -> Path:
    base = os.environ.get("LLM_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llm-kernels")
    try:
        Path(base).mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return Path(base)
    except OSError:
        pass
    # a folder of this process's own (a library loaded by a predictable name from a
    # shared /tmp could be someone else's)
    return Path(tempfile.mkdtemp(prefix="llm-kernels-"))


def build(lib: Path, march: str) -> None:
    """Compile the sources for `-march=<march>` into `lib`, atomically (a concurrent load
    sees the whole file or none). Raises OSError / SubprocessError."""
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent, prefix=".build-") as tmp:
        objects = []
        for src in sorted(SOURCES.glob("*.c")):
            obj = Path(tmp) / f"{src.stem}.o"
            march_flags = MARCH_FLAGS.get(march, [f"-march={march}"])
            subprocess.run(["gcc", *march_flags, *FLAGS, *SOURCE_FLAGS.get(src.name, []), "-c", str(src),
                            "-o", str(obj)], check=True, capture_output=True, text=True, timeout=120)
            objects.append(str(obj))
        built = Path(tmp) / lib.name
        subprocess.run(["gcc", "-shared", *objects, "-o", str(built), "-lm"],
                       check=True, capture_output=True, text=True, timeout=120)
        os.replace(built, lib)


def _prebuilt(key: str, flags: set[str]) -> Path | None:
    """The best library of $LLM_KERNEL_DIR built from these sources that a CPU of these
    flags runs."""
    folder = os.environ.get("LLM_KERNEL_DIR")
    if not folder:
        return None
    for march, needs in PREBUILT.items():
        lib = Path(folder) / f"llm-kernels-{key}-{march}.so"
        if lib.is_file() and needs <= flags:
            return lib
    return None


_built: dict[str, Path | None] = {}


def library() -> Path | None:
    """The library for this CPU (built on first use, cached by source, flags and CPU; or
    prebuilt, see the module's doc), or None when there is none (the reason is logged)."""
    source, flags = _source_key(), _cpu_line("flags")
    key = hashlib.sha256((source + _cpu_line("model name") + flags).encode()).hexdigest()[:16]
    if key in _built:
        return _built[key]
    lib = _cache_dir() / f"llm-kernels-{key}.so"
    if not lib.is_file():
        try:
            build(lib, "native")
        except (OSError, subprocess.SubprocessError) as err:
            prebuilt = _prebuilt(source, set(flags.split(":", 1)[-1].split()))
            if prebuilt is not None:
                log.info("cpu kernels: no compiler here (%s); using %s", err, prebuilt.name)
                _built[key] = prebuilt
                return prebuilt
            detail = getattr(err, "stderr", "") or err
            log.warning("cpu kernels: cannot build %s (%s) and none is prebuilt for this CPU in "
                        "$LLM_KERNEL_DIR; serving the graph as exported", lib.name, detail)
            _built[key] = None
            return None
    _built[key] = lib
    return lib


def prebuild(folder: Path) -> list[Path]:
    """Build the library for each instruction set of PREBUILT into `folder` (x86-64 only;
    an image's build stage)."""
    out = []
    for march in PREBUILT:
        lib = Path(folder) / f"llm-kernels-{_source_key()}-{march}.so"
        build(lib, march)
        out.append(lib)
    return out


def ops(lib: Path) -> set[str]:
    """The ops the library registers on this CPU (GroupAttention needs AVX-512)."""
    import ctypes

    fn = ctypes.CDLL(str(lib)).llm_kernel_ops
    fn.restype = ctypes.c_char_p
    return set(filter(None, fn().decode().split(",")))


def _graph_index(graph) -> tuple[dict, dict, set]:
    """(the node producing each value, the nodes reading each value, the graph's outputs)."""
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    return producer, readers, {o.name for o in graph.output}


def _row_scale(name: str, producer: dict):
    """(the Mul, y, m) when `name` is made by a Mul of a product's output y by a
    RowQuantize's m (W8A8's per-row scale after a product), else None."""
    mul = producer.get(name)
    if mul is None or mul.op_type != "Mul" or len(mul.input) != 2:
        return None
    for i, m in enumerate(mul.input):
        rq = producer.get(m)
        if rq is not None and rq.op_type == "RowQuantize" and rq.domain == DOMAIN and rq.output[1] == m:
            return mul, mul.input[1 - i], m
    return None


def _rewrite(graph, replace: dict, drop: set, constants: set[str] = frozenset()) -> int:
    """Put each new node in the place of the node whose id `replace` maps it from, remove
    the nodes of `drop` and then the `constants` nothing reads any more; returns how
    many nodes were replaced."""
    if not replace:
        return 0
    nodes = [replace.get(id(n), n) for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unread(graph, set(constants))
    return len(replace)


def _drop_unread(graph, names: set[str]) -> None:
    """Remove the initializers `names` (constants of nodes a rewrite removed) that nothing
    reads any more: no node, subgraph, input or output of the graph."""
    from onnx import AttributeProto

    if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return
    keep = {i for n in graph.node for i in n.input} | {v.name for v in (*graph.input, *graph.output)}
    for t in [t for t in graph.initializer if t.name in names - keep]:
        graph.initializer.remove(t)


def fuse_row_quantize(graph) -> int:
    """Replace each W8A8 activation quantization (Abs, ReduceMax over the last axis,
    Div, QuantizeLinear with scale 1/127 and zero point 128; export/w8a8.py) by one
    RowQuantize node with the same two results; returns how many were replaced.
    Chains whose intermediate results are read elsewhere, or whose constants differ,
    are left alone."""
    import numpy as np
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
    constants: set[str] = set()
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
        # in the Abs node's place: readers of m may come before the QuantizeLinear
        replace[id(absn)] = fused
        drop.update({id(quant), id(rmax), id(div)})
        constants.update({rmax.input[1], quant.input[1], quant.input[2]})
    return _rewrite(graph, replace, drop, constants)


def fuse_swiglu(graph) -> int:
    """Replace each W8A8 MLP gate (the fused gate-and-up product's row scale Mul, a Split
    into two halves along the last axis, Sigmoid, and the two Muls of gate * sigmoid(gate)
    * up; export/w8a8.py after the model builder) by one SwiGLU node; returns how many were
    replaced. The scale must be a RowQuantize's m (one per row). Chains whose results are
    read elsewhere are left alone."""
    from onnx import TensorProto, helper, numpy_helper

    producer, readers, graph_outputs = _graph_index(graph)
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer
              if t.data_location != TensorProto.EXTERNAL and len(t.dims) == 1 and t.dims[0] <= 8}

    def only(name, count=1):
        return name not in graph_outputs and len(readers.get(name, [])) == count

    def other(mul, name):
        """The input of a two-input Mul that is not `name` (None if `name` is not one)."""
        ins = list(mul.input)
        return ins[1 - ins.index(name)] if len(ins) == 2 and name in ins else None

    replace, drop, sizes_names = {}, set(), set()
    for split in graph.node:
        if split.op_type != "Split" or len(split.output) != 2 or len(split.input) != 2:
            continue
        axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
        sizes = consts.get(split.input[1])
        scaled = _row_scale(split.input[0], producer)
        if (axis != -1 or sizes is None or len(sizes) != 2 or sizes[0] != sizes[1]
                or scaled is None or not only(split.input[0])):
            continue
        scale, y, m = scaled
        gate, up = split.output
        if not only(gate, 2) or not only(up):
            continue
        sig = next((n for n in readers[gate] if n.op_type == "Sigmoid"), None)
        act = next((n for n in readers[gate] if n.op_type == "Mul"), None)
        if sig is None or act is None or other(act, gate) != sig.output[0] or not only(sig.output[0]):
            continue
        final = readers[up][0]
        if final.op_type != "Mul" or other(final, up) != act.output[0] or not only(act.output[0]):
            continue
        fused = helper.make_node("SwiGLU", [y, m], [final.output[0]], domain=DOMAIN, name=f"{split.name}/SwiGLU")
        replace[id(final)] = fused
        drop.update({id(scale), id(split), id(sig), id(act)})
        sizes_names.add(split.input[1])
    return _rewrite(graph, replace, drop, sizes_names)


def fuse_skip_norm_quantize(graph) -> int:
    """Replace each W8A8 product's row scale Mul, the SkipSimplifiedLayerNormalization it
    feeds (the residual) and the RowQuantize of the normed row by one SkipNormQuantize node
    with the same results (the quantized row, its scale, the sum as the next residual);
    returns how many were replaced. Run after fuse_row_quantize. Norms whose normed row is
    read by anything else (the last one, whose row goes to the head's position pick), or
    with a bias or beta, are left alone."""
    from onnx import helper

    producer, readers, graph_outputs = _graph_index(graph)

    def only_reader(name):
        r = readers.get(name, [])
        return r[0] if len(r) == 1 and name not in graph_outputs else None

    replace, drop, fresh = {}, set(), 0
    for norm in graph.node:
        if (norm.op_type != "SkipSimplifiedLayerNormalization" or norm.domain != "com.microsoft"
                or len(norm.input) != 3 or not norm.output or any(norm.output[1:3])):
            continue
        quant = only_reader(norm.output[0])
        if quant is None or quant.op_type != "RowQuantize" or quant.domain != DOMAIN:
            continue
        for side in (1, 0):    # the builder passes the product as skip; either is a sum
            found = _row_scale(norm.input[side], producer)
            if found is not None and only_reader(norm.input[side]) is norm:
                break
        else:
            continue
        mul, y, m = found
        residual = norm.input[1 - side]
        total = norm.output[3] if len(norm.output) > 3 and norm.output[3] else f"{norm.name}/unused_sum{fresh}"
        fresh += 1
        epsilon = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
        replace[id(norm)] = helper.make_node("SkipNormQuantize", [residual, y, m, norm.input[2]],
                                             [quant.output[0], quant.output[1], total], domain=DOMAIN,
                                             name=f"{norm.name}/SkipNormQuantize", epsilon=epsilon)
        drop.update({id(mul), id(quant)})
    return _rewrite(graph, replace, drop)


# GroupQueryAttention's attributes GroupAttention computes the same way (value: the ones it takes)
_GQA_ATTRIBUTES = {"num_heads": None, "kv_num_heads": None, "scale": None, "do_rotary": {1},
                   "rotary_interleaved": {0}, "local_window_size": {-1}, "softcap": {0.0},
                   "smooth_softmax": {0}, "qk_output": {0}}


def use_group_attention(graph, head_size: int, max_group: int = 4, kv_half: bool = False) -> int:
    """Replace each GroupQueryAttention node that GroupAttention computes the same way
    (packed QKV, rotary on q and k by half-rotation, fp32 KV, no window, softcap, bias or
    sinks; rotary over the whole head; heads of 64, at most 4 query heads per key-value
    head) by a GroupAttention node; returns how many were replaced. `head_size`: the
    model's (genai_config.json), as the graph's shapes are symbolic. Others are left
    alone. `kv_half`: the KV buffers become float16 (the graph's past inputs and present
    outputs), where every attention node was replaced and its KV is the graph's own
    (read by nothing else): half the bytes a decode step streams, and twice the
    sequences in a KV budget."""
    from onnx import TensorProto, helper

    float_inputs = {i.name for i in graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT}
    dims = {t.name: list(t.dims) for t in graph.initializer}   # the cos/sin tables among them
    replaced, kv_names, kept = [], set(), 0
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
                or dims.get(ins[7], [0, 0])[1] * 2 != head_size or dims.get(ins[8]) != dims.get(ins[7])
                or head_size != 64 or not kv_heads or heads % kv_heads or heads // kv_heads > max_group):
            kept += 1
            continue
        node_attrs = {"num_heads": int(heads), **({"scale": float(attrs["scale"])} if attrs.get("scale") else {})}
        graph.node[i].CopyFrom(helper.make_node(
            "GroupAttention", [ins[0], ins[3], ins[4], ins[5], ins[6], ins[7], ins[8]], list(node.output),
            domain=DOMAIN, name=f"{node.name}/GroupAttention", **node_attrs))
        replaced.append(graph.node[i])
        kv_names.update([ins[3], ins[4], *node.output[1:3]])
    if kv_half and replaced and not kept:
        readers = [name for n in graph.node for name in n.input]
        graph_outputs = {o.name: o for o in graph.output}
        own = all(readers.count(n.input[1]) == 1 and readers.count(n.input[2]) == 1
                  and all(o in graph_outputs and o not in readers for o in n.output[1:3]) for n in replaced)
        if own:
            for value in [*graph.input, *graph.output]:
                if value.name in kv_names:
                    value.type.tensor_type.elem_type = TensorProto.FLOAT16
    return len(replaced)


def nibble_form(lib: Path, weight) -> str | None:
    """How NibbleMatMul reads this int8 [K, N] weight: "steps" (20 bytes for 32 weights)
    or "nibbles" (26), forms for at most 16 values in each column's block of 32, as the
    int8 form of a 4-bit checkpoint has; None where neither fits (it would read the int8
    weights directly, slower than onnxruntime)."""
    import ctypes

    import numpy as np

    w = np.ascontiguousarray(weight)
    if w.dtype != np.int8 or w.ndim != 2:
        return None
    fn = ctypes.CDLL(str(lib)).llm_nibble_form
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    return {80: "steps", 104: "nibbles"}.get(fn(w.ctypes.data, w.shape[0], w.shape[1]))


def use_nibble_matmul(model, lib: Path, folder: Path) -> int:
    """Give the graph a branch of its own for calls of a single row and position (a decode
    step alone), in which each W8A8 product whose weights fit NibbleMatMul's packed form
    (`nibble_form`) is a NibbleMatMul node: the same numbers from fewer bytes
    (nibble_matmul.c). Calls of more rows keep onnxruntime's int8 GEMM, faster there. The
    graph becomes one `If` on input_ids having one element, over the graph as it was
    (else) and the rewritten copy (then); the weights stay in the outer graph, read by
    both. `folder`: where the weights' file is. Returns the products rewritten (0: the
    graph is left unchanged)."""
    import copy

    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}

    def dims(name):
        t = inits.get(name)
        return None if t is None else list(t.dims)

    packed = set()
    for node in g.node:
        if (node.op_type != "MatMulIntegerToFloat" or node.domain != "com.microsoft" or len(node.input) != 5
                or inits.get(node.input[1]) is None or inits[node.input[1]].data_type != TensorProto.INT8):
            continue
        w_dims = dims(node.input[1])
        if (len(w_dims) != 2 or dims(node.input[3]) != [w_dims[1]]
                or dims(node.input[2]) not in ([], [1]) or dims(node.input[4]) not in ([], [1])):
            continue
        if nibble_form(lib, numpy_helper.to_array(inits[node.input[1]], base_dir=str(folder))):
            packed.add(node.name)
    if not packed:
        return 0
    outputs = [o.name for o in g.output]

    def branch(tag: str, nibble: bool):
        nodes = [copy.deepcopy(n) for n in g.node]
        renamed = {name: f"{tag}/{name}" for name in outputs}   # a branch's outputs have names of their own
        for n in nodes:
            n.output[:] = [renamed.get(o, o) for o in n.output]
            n.input[:] = [renamed.get(i, i) for i in n.input]
            if nibble and n.name in packed:
                n.op_type, n.domain = "NibbleMatMul", DOMAIN
        values = []
        for o in g.output:
            v = copy.deepcopy(o)
            v.name = renamed[o.name]
            values.append(v)
        return helper.make_graph(nodes, tag, [], values)

    one_row, rows = branch("llm_one_row", True), branch("llm_rows", False)
    del g.node[:]
    g.initializer.append(helper.make_tensor("llm_one_row/one", TensorProto.INT64, [], [1]))
    g.node.extend([
        helper.make_node("Shape", ["input_ids"], ["llm_one_row/shape"], name="llm_one_row/Shape"),
        helper.make_node("ReduceProd", ["llm_one_row/shape"], ["llm_one_row/elements"], keepdims=0,
                         name="llm_one_row/ReduceProd"),
        helper.make_node("Equal", ["llm_one_row/elements", "llm_one_row/one"], ["llm_one_row/cond"],
                         name="llm_one_row/Equal"),
        helper.make_node("If", ["llm_one_row/cond"], outputs, then_branch=one_row, else_branch=rows,
                         name="llm_one_row/If"),
    ])
    return len(packed)
