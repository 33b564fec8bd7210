"""Choosing the next token from one row of logits: greedy, temperature, top-k, top-p,
OpenAI presence/frequency penalties, a per-request seeded generator.

Defaults follow the TensorRT-LLM backend whose tensor interface we speak: without
`temperature`, `top_k` or `top_p` a request is greedy (perf_analyzer and genai-perf
omit them). `temperature=0` is greedy; top-k or top-p without a temperature sample at
temperature 1. Callers with OpenAI semantics (default temperature 1) send it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SamplingParams:
    temperature: float | None = None
    top_p: float = 1.0
    top_k: int = 0                       # 0 = no top-k
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = None        # None = up to the context limit
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False

    @property
    def greedy(self) -> bool:
        if self.top_k == 1:
            return True
        if self.temperature is None:
            return self.top_k == 0 and self.top_p >= 1.0
        return self.temperature <= 0.0

    def validate(self) -> None:
        """Raise ValueError naming the field, the limit and the value."""
        if self.temperature is not None and not (0.0 <= self.temperature <= 100.0):
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (-2.0 <= v <= 2.0):
                raise ValueError(f"{name} must be in [-2, 2], got {v}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


def _log_softmax_at(logits: np.ndarray, token: int) -> float:
    m = float(logits.max())
    return float(logits[token] - m - np.log(np.exp(logits - m, dtype=np.float64).sum()))


class Sampler:
    """Per-sequence state: its generator and the counts its penalties need."""

    def __init__(self, params: SamplingParams, vocab_size: int):
        self.p = params
        # A seeded request gets its own generator: same seed, same output, whatever runs beside it.
        self.rng = np.random.default_rng(params.seed)
        self.penalize = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        self.counts = np.zeros(vocab_size, dtype=np.float32) if self.penalize else None

    def __call__(self, logits: np.ndarray) -> tuple[int, float | None]:
        """(token, its log-probability under the raw logits if asked for)."""
        raw = logits
        if self.penalize:
            logits = logits - (self.counts * self.p.frequency_penalty
                               + (self.counts > 0) * self.p.presence_penalty)
        if self.p.greedy:
            token = int(np.argmax(logits))
        else:
            token = self._sample(logits)
        if self.penalize:
            self.counts[token] += 1
        return token, (_log_softmax_at(raw, token) if self.p.logprobs else None)

    def _sample(self, logits: np.ndarray) -> int:
        temp = 1.0 if self.p.temperature is None or self.p.temperature <= 0 else self.p.temperature
        scaled = logits.astype(np.float64) / temp
        vocab = scaled.shape[0]
        k = self.p.top_k if 0 < self.p.top_k < vocab else vocab
        m = scaled.max()
        if k < vocab:
            idx = np.argpartition(-scaled, k - 1)[:k]
            idx = idx[np.argsort(-scaled[idx], kind="stable")]
        else:
            idx = None
        if self.p.top_p < 1.0:
            # The nucleus, renormalised within the top-k. It rarely needs more than a
            # few hundred tokens: widen a partial sort instead of sorting 49k logits.
            cand = idx if idx is not None else None
            norm = (np.exp(scaled[idx] - m).sum() if idx is not None
                    else np.exp(scaled - m).sum())
            width = min(k, 64)
            while True:
                if cand is not None:
                    top = cand[:width]
                elif width >= vocab:
                    top = np.argsort(-scaled, kind="stable")
                else:
                    part = np.argpartition(-scaled, width - 1)[:width]
                    top = part[np.argsort(-scaled[part], kind="stable")]
                probs = np.exp(scaled[top] - m)
                if width >= k or probs.sum() >= self.p.top_p * norm:
                    break
                width = min(k, width * 8)
            cum = np.cumsum(probs) / norm
            cut = int(np.searchsorted(cum, self.p.top_p)) + 1
            idx, probs = top[:cut], probs[:cut]
        elif idx is not None:
            probs = np.exp(scaled[idx] - m)
        else:
            idx = np.arange(vocab)
            probs = np.exp(scaled - m)
        cdf = np.cumsum(probs)
        pick = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return int(idx[min(pick, len(idx) - 1)])
