"""Find a checkpoint's weight files and check them against config.json without loading them.

safetensors headers are read directly (8-byte length + JSON), which also catches
truncated files; pytorch_model*.bin files are opened memory-mapped.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HOW = "re-save the model with model.save_pretrained(CHECKPOINT_DIR)"


def weight_files(path: Path) -> list[Path]:
    """The weight files: from a shard index, or single/sharded safetensors, or pytorch_model*.bin."""
    for index_name in INDEXES:
        index = path / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"{index} is not a valid shard index ({err}); {HOW}") from err
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise ValueError(f"{path / missing[0]} is missing ({len(missing)} of {len(shards)} shards "
                                 f"listed in {index.name}); copy all shards into the checkpoint")
            return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise ValueError(f"no model.safetensors (or sharded *.safetensors, or pytorch_model*.bin) in {path}; "
                         f"{HOW} (GGUF files must be converted first)")
    return files


def safetensors_shapes(file: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header; raises if the file is not complete."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as err:
        raise ValueError(f"{file} is not a readable safetensors file ({err}); {HOW}") from err
    if 8 + n + end > size:
        raise ValueError(f"{file} is truncated ({size} bytes, its header needs {8 + n + end}); "
                         "copy or download it again")
    return {k: list(v["shape"]) for k, v in tensors.items()}


def torch_shapes(file: Path) -> dict[str, list[int]]:
    import torch
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike
        raise ValueError(f"{file} is not a readable PyTorch checkpoint ({err}); {HOW}") from err
    return {k: list(v.shape) for k, v in state.items()}


def check_weights(path: Path, config: dict) -> list[Path]:
    """Weight files of `path`, readable and shaped as config.json says."""
    files = weight_files(path)
    shapes: dict[str, list[int]] = {}
    for f in files:
        shapes.update(safetensors_shapes(f) if f.suffix == ".safetensors" else torch_shapes(f))
    vocab, hidden, layers = config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]
    embed = next((k for k in shapes if k.endswith("embed_tokens.weight")), None)
    if embed is None:
        raise ValueError(f"no embed_tokens.weight tensor in {', '.join(f.name for f in files)}; "
                         f"these are not {config['architectures'][0]} weights")
    if shapes[embed] != [vocab, hidden]:
        raise ValueError(f"{embed} has shape {shapes[embed]} but config.json says vocab_size {vocab}, "
                         f"hidden_size {hidden}; the weights and config.json do not belong together")
    if "lm_head.weight" in shapes:
        if shapes["lm_head.weight"] != [vocab, hidden]:
            raise ValueError(f"lm_head.weight has shape {shapes['lm_head.weight']}, expected [{vocab}, {hidden}]")
    elif not config.get("tie_word_embeddings", False):
        raise ValueError(f"lm_head.weight is missing and config.json does not tie it to the embeddings "
                         f"(tie_word_embeddings is false); {HOW}")
    prefix = embed[: -len("embed_tokens.weight")] + "layers."
    found = {int(k[len(prefix):].split(".")[0]) for k in shapes if k.startswith(prefix)}
    if found != set(range(layers)):
        raise ValueError(f"the weights hold {len(found)} decoder layers but config.json says "
                         f"num_hidden_layers {layers}; the weights and config.json do not belong together")
    return files
