"""Building the engine from a model version directory and its EngineParams: the one
place where its parts are wired together."""

from __future__ import annotations

import logging
from pathlib import Path

from .decoder import Decoder, DecoderSpec, ModelLoadError, cpu_count, slots_in_budget
from .engine_core import EngineCore, EngineThread
from .kv_cache_manager import KVCacheManager
from .metrics import Metrics
from .model_config import EngineParams
from .output_processor import OutputProcessor
from .prefix_cache import PrefixCache
from .preprocess import Preprocessor, max_chars_per_token
from .responder import Responder
from .scheduler import Scheduler

log = logging.getLogger(__name__)


def load_tokenizer(version_dir: Path):
    from tokenizers import Tokenizer

    path = Path(version_dir) / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"missing {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:
        raise ModelLoadError(f"cannot read {path}: {err}") from err


# A client that left is seen within this long (and one step): each poll of a request is an
# IPC round trip to Triton (responder.py).
CANCEL_POLL_INTERVAL_S = 0.05


def kv_slots(params: EngineParams, row_bytes: int) -> int:
    """Slots of max_model_len tokens that the CPU KV budget holds (the decoder applies
    it with its KV's own element size)."""
    return slots_in_budget(params.max_num_seqs, params.kv_cache_mb, row_bytes, params.max_model_len)


def build_core(decoder, tokenizer, outbox: Responder, *, max_model_len: int, max_queue_size: int,
               prefill_chunk: int, prefix_cache: PrefixCache | None = None, metrics: Metrics | None = None,
               eos_token_ids: list[int] | None = None, stream_interval: int = 1,
               max_prefill_batch: int = 8) -> EngineCore:
    """The engine's step machine over a decoder (tests pass a fake one); its output goes
    through `outbox`."""
    kv = KVCacheManager(decoder, prefix_cache)
    eos = decoder.spec.eos_token_ids if eos_token_ids is None else eos_token_ids
    scheduler = Scheduler(kv, max_model_len=max_model_len, max_queue_size=max_queue_size,
                          prefill_chunk=prefill_chunk, eos_token_ids=eos, max_prefill_batch=max_prefill_batch)
    return EngineCore(decoder, scheduler, OutputProcessor(tokenizer, outbox, metrics, stream_interval), outbox)


def start_engine(core: EngineCore, tokenizer, *, chars_per_token: int | None, tokenize_workers: int,
                 idle_wait: float = 0.05) -> EngineThread:
    """The engine thread over `core`, with its tokenizer workers."""
    pre = Preprocessor(core, tokenizer, core.outbox, chars_per_token=chars_per_token, workers=tokenize_workers)
    return EngineThread(core, pre, idle_wait=idle_wait)


def load_engine(version_dir: Path, params: EngineParams, metrics=None) -> tuple[EngineThread, object]:
    """(engine thread, tokenizer); raises ModelLoadError with a clear message."""
    version_dir = Path(version_dir)
    if not version_dir.is_dir():
        raise ModelLoadError(f"missing model version directory {version_dir}")
    if params.max_num_seqs < 1 or params.max_model_len < 2:
        raise ModelLoadError(f"max_num_seqs ({params.max_num_seqs}) and max_model_len "
                             f"({params.max_model_len}) must be positive")
    if params.stream_interval < 1:
        raise ModelLoadError(f"stream_interval ({params.stream_interval}) must be at least 1 (1: every token)")
    if params.max_prefill_batch < 1:
        raise ModelLoadError(f"max_prefill_batch ({params.max_prefill_batch}) must be at least 1 "
                             "(1: one prompt a prefill call)")
    tokenizer = load_tokenizer(version_dir)
    spec = DecoderSpec.from_genai_config(version_dir / "genai_config.json")
    if spec.context_length and params.max_model_len > spec.context_length:
        raise ModelLoadError(f"max_model_len={params.max_model_len} exceeds the model's context "
                             f"length {spec.context_length}")
    decoder = Decoder(version_dir, params.onnx_model, num_slots=params.max_num_seqs, max_len=params.max_model_len,
                      device=params.device, intra_op_threads=params.intra_op_threads or cpu_count(),
                      kv_cache_gpu_fraction=params.kv_cache_gpu_fraction, kv_cache_mb=params.kv_cache_mb,
                      allow_spinning=bool(params.ort_allow_spinning), cpu_kernels=bool(params.cpu_kernels),
                      packed_decode=bool(params.packed_decode), kv_cache_dtype=params.kv_cache_dtype)
    eos = set(spec.eos_token_ids)
    if params.eos_token and tokenizer.token_to_id(params.eos_token) is not None:
        eos.add(tokenizer.token_to_id(params.eos_token))
    core = build_core(decoder, tokenizer, Responder(poll_interval=CANCEL_POLL_INTERVAL_S), max_model_len=params.max_model_len,
                      max_queue_size=params.max_queue_size, prefill_chunk=params.prefill_chunk,
                      prefix_cache=PrefixCache(params.prefix_cache_mb * 2**20),
                      metrics=metrics, eos_token_ids=sorted(eos), stream_interval=params.stream_interval,
                      max_prefill_batch=params.max_prefill_batch)
    chars_per_token = max_chars_per_token(tokenizer)
    if chars_per_token is None:
        log.warning("this tokenizer gives no bound on characters per token: every prompt is tokenized "
                    "(off the engine loop) before its length is checked")
    else:
        log.info("prompts over %d characters are refused before tokenizing (%d tokens of at most %d characters)",
                 params.max_model_len * chars_per_token, params.max_model_len, chars_per_token)
    return start_engine(core, tokenizer, chars_per_token=chars_per_token,
                        tokenize_workers=min(4, cpu_count())), tokenizer
