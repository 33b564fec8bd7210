"""Turning a parsed request into token ids, off the engine loop.

Triton's execute() thread only reads the tensors (`protocol.parse_request`) and makes
the checks that need no tokenizer: the prompt's size against what the context can hold
(characters for text, ids for `input_ids`) and the queue bound (a place reserved in
the scheduler). A small pool of worker threads then tokenizes and adds the request to
the engine (`EngineCore.add_request`); the engine thread never waits on it.

Why a pool and these tokenizer calls: `tokenizers`' `encode()` and `decode()` hold the
GIL for the whole call, so a multi-megabyte prompt stopped every stream of the stub
while it was encoded. `encode_batch_fast` and `decode_batch` release the GIL while they
work, so a worker tokenizing costs only its own request (measured: docs/engine.md,
"Tokenizing off the engine loop").
"""

from __future__ import annotations

import ctypes
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from .error_kinds import CANCELLED, CONTEXT, INTERNAL, OVER_CAPACITY, RequestError
from .request import sink_cancelled, token_budget

log = logging.getLogger(__name__)

# Unicode composition (NFC, NFKC: Qwen2's normalizer) turns at most this many code points
# into one character (U+1F82 from four); decomposition, case folding and prefixes only
# lengthen the text. tests/backend checks the number against unicodedata.
MAX_COMPOSED = 4
_LENGTHENING_NORMALIZERS = {"NFD", "NFKD", "Lowercase", "Prepend", "ByteLevel"}
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts", "Split", "Punctuation"}

# A request whose prompt had at least this many characters is followed by a malloc_trim:
# the tokenizer's buffers for it are megabytes, allocated in the worker thread's glibc
# arena, which kept them after they were freed (the stub's memory grew for good).
TRIM_AFTER_CHARS = 1 << 16


def max_chars_per_token(tokenizer) -> int | None:
    """The most characters of a prompt one token can stand for, or None where this
    tokenizer gives no such bound.

    A vocabulary string is at least as long as the text its token covers: byte-level
    BPE writes each byte of the text as one character, SentencePiece each character (a
    space as "▁"); byte-fallback tokens ("<0xE3>") are longer than the byte they stand
    for, which only loosens the bound. So `max_model_len` tokens cover at most
    `max_model_len * longest vocabulary string` characters (SmolLM2: 81), times
    MAX_COMPOSED when a normalizer composes characters. It does not hold, and None is
    returned, when the pipeline can drop text (a normalizer that strips, a pre-tokenizer
    that removes whitespace, an added token that swallows the spaces beside it) or turn
    any run of unknown text into one token (WordPiece, WordLevel, fused unknowns).
    """
    try:
        spec = json.loads(tokenizer.to_str())
        vocab = tokenizer.get_vocab(with_added_tokens=True)
    except Exception:            # not a tokenizers.Tokenizer
        return None
    factor = _normalizer_factor(spec.get("normalizer"))
    model = spec.get("model") or {}
    unk_spans = model.get("type") not in ("BPE", "Unigram") or (
        (model.get("type") == "Unigram" or (model.get("unk_token") is not None and model.get("fuse_unk")))
        and not model.get("byte_fallback"))
    if (factor is None or unk_spans or not _keeps_text(spec.get("pre_tokenizer")) or not vocab
            or any(t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens") or [])):
        return None
    return factor * max(len(token) for token in vocab)


def _normalizer_factor(spec) -> int | None:
    """How many prompt characters one normalized character may come from, None if unbounded."""
    if spec is None or spec.get("type") in _LENGTHENING_NORMALIZERS:
        return 1
    kind = spec.get("type")
    if kind in ("NFC", "NFKC"):
        return MAX_COMPOSED
    if kind == "Replace":
        pattern = (spec.get("pattern") or {}).get("String")
        return 1 if pattern is not None and len(spec.get("content", "")) >= len(pattern) else None
    if kind == "Sequence":
        factor = 1
        for part in spec.get("normalizers", []):
            f = _normalizer_factor(part)
            if f is None:
                return None
            factor *= f
        return factor
    return None   # Strip, StripAccents, BertNormalizer, Precompiled, ...: can drop text


def _keeps_text(spec) -> bool:
    """Whether the pre-tokenizer hands every character on to the model."""
    if spec is None:
        return True
    if spec.get("type") == "Sequence":
        return all(_keeps_text(p) for p in spec.get("pretokenizers", []))
    return spec.get("type") in _KEEPING_PRE_TOKENIZERS and spec.get("behavior") != "Removed"


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, the GIL released while the tokenizer works."""
    return tokenizer.encode_batch_fast([text], add_special_tokens=False)[0].ids


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode_batch([ids], skip_special_tokens=False)[0]


_trimming = threading.Lock()


def _malloc_trim() -> None:
    """Give the freed memory of glibc's arenas back to the OS (one trim at a time; it
    releases the GIL)."""
    if not _trimming.acquire(blocking=False):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):             # not glibc
        pass
    finally:
        _trimming.release()


class Preprocessor:
    """Tokenizes requests on `workers` threads and adds them to the engine.

    Every request handed to `submit` ends with exactly one of: refused at once
    (RequestError for the caller), failed by a worker through its sink (sent by the
    outbox, responder.py), or queued in the engine, which then owns its end.
    """

    def __init__(self, core, tokenizer, outbox, *, chars_per_token: int | None, workers: int = 2):
        self.core = core                   # engine_core.EngineCore
        self.sched = core.scheduler        # the queue places: reserve / release
        self.send = outbox.send
        self.tok = tokenizer
        self.max_chars = None if chars_per_token is None else core.max_model_len * chars_per_token
        self.chars_per_token = chars_per_token
        self.closed = False
        self._busy = 0                     # accepted, not yet queued in the scheduler or failed
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="llm-tokenize")

    @property
    def busy(self) -> int:
        return self._busy

    def check_size(self, req) -> None:
        """Refuse, before any tokenizing, a prompt that cannot fit the context."""
        limit = self.core.max_model_len
        if req.ids is not None:
            token_budget(len(req.ids), req.params.max_tokens, limit)
        elif self.max_chars is not None and len(req.text) > self.max_chars:
            raise RequestError(CONTEXT, f"this model's maximum context length is {limit} tokens, but the prompt "
                                        f"has {len(req.text)} characters, more than the {self.max_chars} that "
                                        f"{limit} tokens can hold (at most {self.chars_per_token} characters "
                                        "a token for this tokenizer)")

    def submit(self, req, sink) -> None:
        """Called by Triton's execute(): cheap checks, then queue for a worker. Raises
        RequestError when the request is refused at once."""
        self.check_size(req)
        self.sched.reserve()
        with self._lock:
            if self.closed:
                self.sched.release()
                raise RequestError(OVER_CAPACITY, "the model is unloading; retry later")
            self._busy += 1
            self._pool.submit(self._prepare, req, sink)

    def _prepare(self, req, sink) -> None:
        big = len(req.text or "") >= TRIM_AFTER_CHARS
        queued = False
        try:
            prompt = self._tokenize(req, sink)
            if prompt is None:
                self.send(sink.fail, CANCELLED, "the request was cancelled by the client")
            else:
                self.core.add_request(prompt, req.params, sink, reserved=True)
                queued = True
        except RequestError as err:
            self.send(sink.fail, err.kind, err.message)
        except Exception as err:
            log.exception("preparing a request failed")
            self.send(sink.fail, INTERNAL, f"the prompt could not be tokenized: {err}")
        finally:
            if not queued:
                self.sched.release()
            req.text = req.ids = None      # the prompt's text is not kept while the request runs
            with self._lock:
                self._busy -= 1
            if big:
                _malloc_trim()

    def _tokenize(self, req, sink) -> list[int] | None:
        """The prompt's ids, or None when the client left while it waited or was tokenized."""
        if self.closed:
            raise RequestError(INTERNAL, "the model was unloaded before the request finished")
        if sink_cancelled(sink):
            return None
        if req.ids is not None:
            prompt = req.ids.tolist()
            if req.echo:
                req.prompt_text = decode(self.tok, prompt)
        else:
            prompt = encode(self.tok, req.text) if req.text else []
            if req.echo:
                req.prompt_text = req.text
        return None if sink_cancelled(sink) else prompt

    def close(self) -> None:
        """Stop accepting; wait for the requests being tokenized (they queue in the
        engine or fail)."""
        with self._lock:
            self.closed = True
        self._pool.shutdown(wait=True)
