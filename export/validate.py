"""Check a Hugging Face checkpoint directory before any work is done.

Every problem is a `CheckpointError` whose message starts with the piece at fault
(config, weights, tokenizer, special tokens, chat template), names the file and
says what to do. Cheap: weights are checked from their headers, never loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .pad_heads import head_dim, unsupported_reason
from .weights import check_weights

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
REQUIRED_CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
SAVE_TOKENIZER = "save it with tokenizer.save_pretrained(CHECKPOINT_DIR)"


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

    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str | None:
        """The chat template rendered with plain Jinja (None without a template)."""
        if not self.chat_template:
            return None
        import jinja2

        return jinja2.Environment().from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token, eos_token=self.eos_token)


def read_json(path: Path, what: str, fix: str, required: bool = True) -> dict:
    if not path.is_file():
        if not required:
            return {}
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


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def check_config(path: Path) -> tuple[dict, str]:
    config = read_json(path / "config.json", "config",
                       "the checkpoint directory must hold the model's config.json (model.config.save_pretrained)")
    archs = config.get("architectures") or []
    arch = archs[0] if archs else ""
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"config: {path / 'config.json'} declares architecture {arch or 'none'!r}; "
                              f"supported are {', '.join(SUPPORTED_ARCHITECTURES)}")
    missing = [k for k in REQUIRED_CONFIG_KEYS if not isinstance(config.get(k), int)]
    if missing:
        raise CheckpointError(f"config: {path / 'config.json'} lacks {', '.join(missing)}; "
                              "re-save the config with transformers")
    reason = unsupported_reason(config)
    if reason:
        raise CheckpointError(f"config: {path / 'config.json'} has head size {head_dim(config)}; onnxruntime's "
                              f"GroupQueryAttention needs a multiple of 16 and this model cannot be padded "
                              f"exactly ({reason})")
    return config, arch


def load_tokenizer(path: Path):
    """A `tokenizers.Tokenizer`: tokenizer.json, or one transformers can build from slow files."""
    from tokenizers import Tokenizer

    tok_json = path / "tokenizer.json"
    if tok_json.is_file():
        try:
            return Tokenizer.from_file(str(tok_json))
        except Exception as err:  # the tokenizers library raises plain Exception
            raise CheckpointError(f"tokenizer: {tok_json} does not load ({err}); {SAVE_TOKENIZER}") from err
    slow = [n for n in ("tokenizer.model", "vocab.json") if (path / n).is_file()]
    if not slow:
        raise CheckpointError(f"tokenizer: {tok_json} is missing (and there is no tokenizer.model or "
                              f"vocab.json + merges.txt to build it from); {SAVE_TOKENIZER}")
    try:
        from transformers import AutoTokenizer
        fast = AutoTokenizer.from_pretrained(str(path))
        return fast.backend_tokenizer
    except Exception as err:
        raise CheckpointError(f"tokenizer: {tok_json} is missing and {path / slow[0]} does not load "
                              f"as a fast tokenizer ({err}); {SAVE_TOKENIZER}") from err


def check_special_tokens(path: Path, config: dict, tok_cfg: dict, tokenizer) -> tuple[str, str, int | None, list[int]]:
    """Tokenizer special tokens must exist and agree with config.json / generation_config.json."""
    gen = read_json(path / "generation_config.json", "generation config",
                    "fix or delete generation_config.json", required=False)
    cfg_name = path / "tokenizer_config.json"
    # Older checkpoints keep special tokens in special_tokens_map.json only.
    specials = {**read_json(path / "special_tokens_map.json", "tokenizer", SAVE_TOKENIZER, required=False),
                **{k: v for k, v in tok_cfg.items() if v is not None}}
    bos, eos = token_text(specials.get("bos_token")), token_text(specials.get("eos_token"))
    if not eos:
        raise CheckpointError(f"special tokens: {cfg_name} (nor special_tokens_map.json) defines no eos_token; "
                              "set it to the token that ends a turn (tokenizer.eos_token = ...; save_pretrained)")
    vocab_size = config["vocab_size"]
    tok_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if tok_size > vocab_size:
        raise CheckpointError(f"tokenizer: {path / 'tokenizer.json'} has {tok_size} tokens but config.json "
                              f"vocab_size is {vocab_size}; the tokenizer does not belong to these weights")
    eos_id = tokenizer.token_to_id(eos)
    if eos_id is None:
        raise CheckpointError(f"special tokens: eos_token {eos!r} of {cfg_name} is not in the tokenizer "
                              "vocabulary; fix tokenizer_config.json")
    # Each file that names the ids must agree with the tokenizer: generation reads
    # generation_config.json, but other runtimes (and our own limits) read config.json,
    # and a mismatch in either is the model that never stops in production.
    sources = [(path / "config.json", config), (path / "generation_config.json", gen)]
    expected: list[int] = []
    for source, values in sources:
        ids = _ids(values.get("eos_token_id"))
        if ids and eos_id not in ids:
            raise CheckpointError(f"special tokens: tokenizer eos_token {eos!r} (id {eos_id}) in {cfg_name} disagrees "
                                  f"with eos_token_id {ids} in {source}; generation would not stop "
                                  "where the model was trained to. Make them agree")
        expected += [i for i in ids if i not in expected]
    bos_id = tokenizer.token_to_id(bos) if bos else None
    if bos and bos_id is None:
        raise CheckpointError(f"special tokens: bos_token {bos!r} of {cfg_name} is not in the tokenizer "
                              "vocabulary; fix tokenizer_config.json")
    for source, values in sources:
        model_bos = values.get("bos_token_id")
        if bos_id is not None and model_bos is not None and bos_id != model_bos:
            raise CheckpointError(f"special tokens: tokenizer bos_token {bos!r} (id {bos_id}) in {cfg_name} disagrees "
                                  f"with bos_token_id {model_bos} in {source}; make them agree")
    return bos, eos, bos_id, expected or [eos_id]


def check_chat_template(path: Path, tok_cfg: dict, override: Path | None,
                        no_template: bool) -> tuple[str | None, str]:
    if no_template:
        return None, "none (--no-chat-template)"
    if override is not None:
        if not Path(override).is_file():
            raise CheckpointError(f"chat template: {override} (--chat-template) does not exist")
        template, source = Path(override).read_text(), str(Path(override).resolve())
    elif (path / "chat_template.jinja").is_file():
        template, source = (path / "chat_template.jinja").read_text(), str((path / "chat_template.jinja").resolve())
    else:
        template, source = tok_cfg.get("chat_template"), str((path / "tokenizer_config.json").resolve())
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
    if not template or not isinstance(template, str):
        raise CheckpointError(f"chat template: none in {path / 'chat_template.jinja'} or the chat_template of "
                              f"{path / 'tokenizer_config.json'}; pass --chat-template FILE, or "
                              "--no-chat-template for a base model")
    import jinja2
    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as err:
        raise CheckpointError(f"chat template: {source} is not valid Jinja (line {err.lineno}: {err.message}); "
                              "fix it or pass --chat-template FILE") from err
    return template, source


def validate_checkpoint(path: Path, chat_template_file: Path | None = None,
                        no_chat_template: bool = False) -> Checkpoint:
    """Validate `path` and describe it, or raise `CheckpointError`."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint: {path} is not a directory; pass a Hugging Face checkpoint directory")
    config, arch = check_config(path)
    try:
        weights = check_weights(path, config)
    except ValueError as err:
        raise CheckpointError(f"weights: {err}") from err
    tok_cfg = read_json(path / "tokenizer_config.json", "tokenizer", SAVE_TOKENIZER)
    tokenizer = load_tokenizer(path)
    bos, eos, bos_id, eos_ids = check_special_tokens(path, config, tok_cfg, tokenizer)
    template, source = check_chat_template(path, tok_cfg, chat_template_file, no_chat_template)
    return Checkpoint(path=path, config=config, architecture=arch, weight_files=weights,
                      tokenizer_config=tok_cfg, chat_template=template, chat_template_source=source,
                      bos_token=bos, eos_token=eos, bos_token_id=bos_id, eos_token_ids=eos_ids)
