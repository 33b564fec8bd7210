"""Check a Hugging Face checkpoint directory before any work is done.

Every problem is a `CheckpointError` naming the file and what to do about it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class CheckpointError(ValueError):
    """A missing or broken piece of the checkpoint; the message says which and what to do."""


@dataclass
class Checkpoint:
    """What the export needs to know about a validated checkpoint."""

    path: Path
    config: dict
    architecture: str
    weight_files: list[Path]
    tokenizer_config: dict
    chat_template: str | None          # None only with --no-chat-template
    chat_template_source: str          # file it came from, or "none"
    bos_token: str
    eos_token: str
    bos_token_id: int | None
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def context_length(self) -> int:
        return int(self.config.get("max_position_embeddings") or 0)


def _read_json(path: Path, what: str, fix: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{what}: {path} is missing; {fix}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{what}: {path} is not valid JSON ({err}); {fix}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{what}: {path} must hold a JSON object; {fix}")
    return data


def token_text(value) -> str:
    """tokenizer_config.json stores special tokens as strings or AddedToken dicts."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return "" if value is None else str(value)


def validate_checkpoint(path: Path, chat_template_file: Path | None = None,
                        no_chat_template: bool = False) -> Checkpoint:
    """Validate `path` and describe it (minimal checks; see the full checks below)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint: {path} is not a directory; pass a Hugging Face checkpoint directory")
    config = _read_json(path / "config.json", "config",
                        "the checkpoint directory must hold the model's config.json")
    archs = config.get("architectures") or []
    arch = archs[0] if archs else ""
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"config: {path / 'config.json'} declares architecture {arch or 'none'!r}; "
                              f"supported are {', '.join(SUPPORTED_ARCHITECTURES)}")
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    tok_cfg = _read_json(path / "tokenizer_config.json", "tokenizer",
                         "save the tokenizer with tokenizer.save_pretrained(CHECKPOINT_DIR)")
    if chat_template_file is not None:
        template, source = Path(chat_template_file).read_text(), str(chat_template_file)
    elif no_chat_template:
        template, source = None, "none"
    elif (path / "chat_template.jinja").is_file():
        template, source = (path / "chat_template.jinja").read_text(), str(path / "chat_template.jinja")
    else:
        template, source = tok_cfg.get("chat_template"), str(path / "tokenizer_config.json")
    eos_ids = config.get("eos_token_id")
    return Checkpoint(
        path=path, config=config, architecture=arch, weight_files=weights, tokenizer_config=tok_cfg,
        chat_template=template, chat_template_source=source,
        bos_token=token_text(tok_cfg.get("bos_token")), eos_token=token_text(tok_cfg.get("eos_token")),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=list(eos_ids) if isinstance(eos_ids, list) else ([eos_ids] if eos_ids is not None else []),
    )
