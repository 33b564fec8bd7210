"""Rewrites of the builder's ONNX graph, made in place in a staged version directory.

- `rewrite_in_place`: load `model.onnx` with its external weights, apply a rewrite,
  save both files back (used by every rewrite below and by `w8a8.py`).
- `group_by_input`: weight products that read the same activation (an MLP's gate and
  up projections), the unit of fusion.
- `fuse_matmulnbits`: for 4- and 8-bit exports, MatMulNBits nodes that read the same
  activation become one wider node and a Split. The activation is then read (and, with
  int8 activations, quantized) once per layer instead of twice: a one-row decode step of
  SmolLM2 int4 took 7.90 instead of 8.39 ms here (median of 6 interleaved runs). Every
  output column is computed as before, so the logits are bit for bit the same (checked
  on SmolLM2, prefill and a 4-row decode).
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np

# Recorded in the manifest; a cached export made by another version of this file is rebuilt.
FUSE_SCHEME = ("MatMulNBits reading one activation fused; rewrite "
               + hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12])


def rewrite_in_place(version_dir: Path, rewrite: Callable, onnx_name: str = "model.onnx") -> dict:
    """Apply `rewrite(model) -> stats` to `version_dir/onnx_name` and its external data."""
    import onnx

    path = Path(version_dir) / onnx_name
    data_name = onnx_name + ".data"
    model = onnx.load(str(path))                      # with its external weights
    stats = rewrite(model)
    tmp = path.with_name(onnx_name + ".rewrite.tmp")
    tmp_data = data_name + ".rewrite.tmp"
    onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=tmp_data, size_threshold=1024)
    # point the graph at the final data file name, then swap both files in
    saved = onnx.load(str(tmp), load_external_data=False)
    for tensor in saved.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data_name
    onnx.save_model(saved, str(tmp))
    os.replace(Path(version_dir) / tmp_data, Path(version_dir) / data_name)
    os.replace(tmp, path)
    return stats


def group_by_input(graph, key: Callable) -> dict:
    """Nodes for which `key(node)` is not None, grouped by that key, in graph order.
    Keys start with the activation the node reads (its first input)."""
    groups: dict = defaultdict(list)
    for node in graph.node:
        k = key(node)
        if k is not None:
            groups[k].append(node)
    return groups


def replace_groups(graph, groups: dict, emit: Callable) -> int:
    """Rebuild the node list: each group's nodes are replaced, at the place of its first
    node, by `emit(nodes)` (a list of nodes writing the same outputs). Nodes are keyed by
    their first output: ONNX node names are optional and need not be unique. Returns how
    many groups had more than one node."""
    first = {nodes[0].output[0]: nodes for nodes in groups.values()}
    members = {n.output[0] for nodes in groups.values() for n in nodes}
    new_nodes = []
    for node in graph.node:
        out = node.output[0]
        if out not in members:
            new_nodes.append(node)
        elif out in first:
            new_nodes += emit(first[out])
    del graph.node[:]
    graph.node.extend(new_nodes)
    return sum(len(nodes) > 1 for nodes in groups.values())


def split_node(graph, fused_output: str, outputs: list[str], widths: list[int], prefix: str):
    """A Split of the last axis of `fused_output` back into `outputs`."""
    from onnx import helper, numpy_helper

    graph.initializer.append(numpy_helper.from_array(np.array(widths, np.int64), f"{prefix}/split"))
    return helper.make_node("Split", [fused_output, f"{prefix}/split"], outputs, axis=-1, name=f"{prefix}/Split")


def drop_unused_initializers(graph, candidates: set[str]) -> None:
    still_read = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name not in candidates or t.name in still_read]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def fuse_matmulnbits(model) -> dict:
    """Fuse MatMulNBits nodes with constant weights that read the same activation and
    agree on every attribute but N (their weights, scales and zero points are per output
    row, so they concatenate along N)."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}

    def key(node):
        if node.op_type != "MatMulNBits" or not all(i in inits for i in node.input[1:] if i):
            return None
        if len(node.input) > 4 and node.input[4]:
            return None                               # g_idx is per input column: not fusable
        return (node.input[0], tuple(len(n) > 0 for n in node.input),
                tuple(sorted((a.name, a.i) for a in node.attribute if a.name != "N")))

    groups = {k: v for k, v in group_by_input(g, key).items() if len(v) > 1}
    replaced = {i for nodes in groups.values() for n in nodes for i in n.input[1:] if i}

    def emit(nodes):
        p = f"{nodes[0].output[0]}/fused"
        inputs = [nodes[0].input[0]]
        for j in range(1, len(nodes[0].input)):
            if not nodes[0].input[j]:
                inputs.append("")
                continue
            arrays = [numpy_helper.to_array(inits[n.input[j]]) for n in nodes]
            g.initializer.append(numpy_helper.from_array(np.concatenate(arrays, axis=0), f"{p}/input{j}"))
            inputs.append(f"{p}/input{j}")
        widths = [next(a.i for a in n.attribute if a.name == "N") for n in nodes]
        fused = helper.make_node("MatMulNBits", inputs, [f"{p}/y"], domain=nodes[0].domain, name=p)
        for a in nodes[0].attribute:
            fused.attribute.append(helper.make_attribute(a.name, sum(widths) if a.name == "N" else a.i))
        return [fused, split_node(g, f"{p}/y", [n.output[0] for n in nodes], widths, p)]

    fused = replace_groups(g, groups, emit)
    drop_unused_initializers(g, replaced)
    return {"scheme": FUSE_SCHEME, "fused_groups": fused}


def fuse_export(version_dir: Path) -> dict:
    """Fuse the MatMulNBits of a staged 4/8-bit export in place."""
    import onnx

    ops = {n.op_type for n in onnx.load(str(Path(version_dir) / "model.onnx"), load_external_data=False).graph.node}
    if "MatMulNBits" not in ops:
        return {"scheme": FUSE_SCHEME, "fused_groups": 0}
    return rewrite_in_place(version_dir, fuse_matmulnbits)
