"""Checkpoint validation: every missing or broken piece is refused with a message that
names the piece and the file. In-process and fast (no export)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from export.validate import CheckpointError, validate_checkpoint


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def refused(ckpt, *words, **kwargs) -> str:
    with pytest.raises(CheckpointError) as err:
        validate_checkpoint(ckpt, **kwargs)
    message = str(err.value)
    for word in words:
        assert word in message, message
    return message


def test_valid_checkpoint_is_described(tiny_checkpoint):
    ckpt = validate_checkpoint(tiny_checkpoint)
    assert ckpt.architecture == "LlamaForCausalLM"
    assert (ckpt.bos_token, ckpt.eos_token) == ("<s>", "</s>")
    assert ckpt.eos_token_ids == [2] and ckpt.context_length == 256
    assert "{% for m in messages %}" in ckpt.chat_template
    assert [f.name for f in ckpt.weight_files] == ["model.safetensors"]


def test_not_a_directory(tmp_path):
    refused(tmp_path / "nowhere", "checkpoint", "not a directory")


# --- config.json ---------------------------------------------------------------

def test_config_missing(ckpt_copy):
    (ckpt_copy / "config.json").unlink()
    refused(ckpt_copy, "config", "config.json is missing")


def test_config_not_json(ckpt_copy):
    (ckpt_copy / "config.json").write_text("{ not json")
    refused(ckpt_copy, "config", "config.json", "not valid JSON")


def test_unsupported_architecture(ckpt_copy):
    edit_json(ckpt_copy / "config.json", architectures=["GPT2LMHeadModel"])
    refused(ckpt_copy, "config", "GPT2LMHeadModel", "LlamaForCausalLM")


def test_config_lacks_sizes(ckpt_copy):
    edit_json(ckpt_copy / "config.json", hidden_size=None)
    refused(ckpt_copy, "config", "hidden_size")


@pytest.mark.parametrize("arch", ["MistralForCausalLM", "Qwen2ForCausalLM"])
def test_llama_family_architectures_accepted(ckpt_copy, arch):
    edit_json(ckpt_copy / "config.json", architectures=[arch])
    assert validate_checkpoint(ckpt_copy).architecture == arch


# --- weights -------------------------------------------------------------------

def test_weights_missing(ckpt_copy):
    (ckpt_copy / "model.safetensors").unlink()
    refused(ckpt_copy, "weights", "no model.safetensors")


def test_weights_truncated(ckpt_copy):
    data = (ckpt_copy / "model.safetensors").read_bytes()
    (ckpt_copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    refused(ckpt_copy, "weights", "model.safetensors", "truncated")


def test_weights_garbage(ckpt_copy):
    (ckpt_copy / "model.safetensors").write_bytes(b"\xff" * 64)
    refused(ckpt_copy, "weights", "model.safetensors", "not a readable safetensors")


def test_weights_disagree_with_config_vocab(ckpt_copy):
    edit_json(ckpt_copy / "config.json", vocab_size=1000)
    refused(ckpt_copy, "weights", "embed_tokens.weight", "vocab_size 1000")


def test_weights_disagree_with_config_layers(ckpt_copy):
    edit_json(ckpt_copy / "config.json", num_hidden_layers=3)
    refused(ckpt_copy, "weights", "num_hidden_layers 3")


def test_untied_lm_head_missing(ckpt_copy):
    state = load_file(ckpt_copy / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, ckpt_copy / "model.safetensors", metadata={"format": "pt"})
    refused(ckpt_copy, "weights", "lm_head.weight is missing", "tie_word_embeddings")


def _shard(ckpt):
    state = load_file(ckpt / "model.safetensors")
    keys = sorted(state)
    parts = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
             "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in parts.items():
        save_file({k: state[k] for k in part}, ckpt / name, metadata={"format": "pt"})
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, part in parts.items() for k in part}}))


def test_sharded_safetensors_accepted(ckpt_copy):
    _shard(ckpt_copy)
    assert len(validate_checkpoint(ckpt_copy).weight_files) == 2


def test_shard_missing(ckpt_copy):
    _shard(ckpt_copy)
    (ckpt_copy / "model-00002-of-00002.safetensors").unlink()
    refused(ckpt_copy, "weights", "model-00002-of-00002.safetensors is missing", "index")


def test_pytorch_bin_accepted(ckpt_copy):
    torch.save(load_file(ckpt_copy / "model.safetensors"), ckpt_copy / "pytorch_model.bin")
    (ckpt_copy / "model.safetensors").unlink()
    assert [f.name for f in validate_checkpoint(ckpt_copy).weight_files] == ["pytorch_model.bin"]


def test_pytorch_bin_corrupt(ckpt_copy):
    (ckpt_copy / "model.safetensors").unlink()
    (ckpt_copy / "pytorch_model.bin").write_bytes(b"not a pickle")
    refused(ckpt_copy, "weights", "pytorch_model.bin", "not a readable PyTorch checkpoint")


# --- tokenizer and special tokens ------------------------------------------------

def test_tokenizer_json_missing(ckpt_copy):
    (ckpt_copy / "tokenizer.json").unlink()
    refused(ckpt_copy, "tokenizer", "tokenizer.json is missing", "save_pretrained")


def test_tokenizer_json_broken(ckpt_copy):
    (ckpt_copy / "tokenizer.json").write_text('{"model": 42}')
    refused(ckpt_copy, "tokenizer", "tokenizer.json does not load")


def test_tokenizer_config_missing(ckpt_copy):
    (ckpt_copy / "tokenizer_config.json").unlink()
    refused(ckpt_copy, "tokenizer", "tokenizer_config.json is missing")


def test_eos_token_undefined(ckpt_copy):
    edit_json(ckpt_copy / "tokenizer_config.json", eos_token=None)
    refused(ckpt_copy, "special tokens", "defines no eos_token")


def test_special_tokens_from_special_tokens_map(ckpt_copy):
    edit_json(ckpt_copy / "tokenizer_config.json", eos_token=None, bos_token=None)
    (ckpt_copy / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>"}, "eos_token": {"content": "</s>"}}))
    ckpt = validate_checkpoint(ckpt_copy)
    assert (ckpt.bos_token, ckpt.eos_token) == ("<s>", "</s>")


def test_eos_token_not_in_vocabulary(ckpt_copy):
    edit_json(ckpt_copy / "tokenizer_config.json", eos_token="<|nowhere|>")
    refused(ckpt_copy, "special tokens", "<|nowhere|>", "not in the tokenizer vocabulary")


def test_eos_disagrees_with_config(ckpt_copy):
    # The tokenizer loads fine but would end turns with another token than the model.
    edit_json(ckpt_copy / "tokenizer_config.json", eos_token="<|assistant|>")
    refused(ckpt_copy, "special tokens", "<|assistant|>", "disagrees", "eos_token_id [2]")


def test_eos_disagrees_with_generation_config(ckpt_copy):
    edit_json(ckpt_copy / "generation_config.json", eos_token_id=[3, 4])
    refused(ckpt_copy, "special tokens", "disagrees", "generation_config.json")


def test_eos_disagrees_with_config_json_even_when_generation_config_agrees(ckpt_copy):
    # generation_config.json alone would let transformers stop right; anything that
    # reads config.json (other runtimes, our limits) would not.
    edit_json(ckpt_copy / "config.json", eos_token_id=1)
    refused(ckpt_copy, "special tokens", "disagrees", "eos_token_id [1]", "config.json")


def test_bos_disagrees_with_config(ckpt_copy):
    edit_json(ckpt_copy / "tokenizer_config.json", bos_token="<|user|>")
    refused(ckpt_copy, "special tokens", "bos_token", "disagrees")


# --- chat template ----------------------------------------------------------------

def test_chat_template_missing(ckpt_copy):
    (ckpt_copy / "chat_template.jinja").unlink()
    refused(ckpt_copy, "chat template", "--chat-template", "--no-chat-template")


def test_chat_template_from_tokenizer_config(ckpt_copy):
    template = (ckpt_copy / "chat_template.jinja").read_text()
    (ckpt_copy / "chat_template.jinja").unlink()
    edit_json(ckpt_copy / "tokenizer_config.json", chat_template=template)
    assert validate_checkpoint(ckpt_copy).chat_template == template


def test_chat_template_override_and_opt_out(ckpt_copy, tmp_path):
    (ckpt_copy / "chat_template.jinja").unlink()
    override = tmp_path / "t.jinja"
    override.write_text("{{ messages[0]['content'] }}")
    assert validate_checkpoint(ckpt_copy, chat_template_file=override).chat_template.startswith("{{")
    assert validate_checkpoint(ckpt_copy, no_chat_template=True).chat_template is None
    refused(ckpt_copy, "chat template", "does not exist", chat_template_file=tmp_path / "missing.jinja")


def test_chat_template_invalid_jinja(ckpt_copy):
    (ckpt_copy / "chat_template.jinja").write_text("{% for m in messages %}{{ m }")
    refused(ckpt_copy, "chat template", "chat_template.jinja", "not valid Jinja")


def test_slow_tokenizer_files_are_an_equivalent(ckpt_copy):
    # vocab.json + merges.txt instead of tokenizer.json: accepted when it loads.
    from tokenizers import Tokenizer

    Tokenizer.from_file(str(ckpt_copy / "tokenizer.json")).model.save(str(ckpt_copy))
    (ckpt_copy / "tokenizer.json").unlink()
    edit_json(ckpt_copy / "tokenizer_config.json", tokenizer_class="GPT2Tokenizer")
    assert validate_checkpoint(ckpt_copy).eos_token == "</s>"


def test_head_size_that_cannot_be_padded_exactly(ckpt_copy):
    # Head size 8 is padded to 16 for GroupQueryAttention, which is exact only for
    # RoPE whose frequencies do not depend on the head size.
    edit_json(ckpt_copy / "config.json", head_dim=8, num_attention_heads=8,
              rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0})
    refused(ckpt_copy, "config", "head size 8", "multiple of 16", "yarn")
