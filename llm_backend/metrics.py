"""The engine's metrics: the plain `Metrics` protocol the output processor calls, and
`TritonMetrics`, which maps it to Triton metric families (pb_utils.MetricFamily, shown
on Triton's metrics port). `pb_utils` is passed in, so the module imports without Triton.
"""

from __future__ import annotations

from typing import Protocol


class Metrics(Protocol):
    """Generated tokens are those of num_output_tokens: an EOS that ends a sequence is
    not one (nor is the wait for it an inter-token latency)."""

    def state(self, waiting: int, running: int, kv_usage: float) -> None: ...

    def first_token(self, seconds: float, prompt_tokens: int, generated: int) -> None: ...

    def tokens(self, n: int, inter_token_seconds: list[float]) -> None: ...


class NullMetrics:
    def state(self, waiting, running, kv_usage):
        pass

    def first_token(self, seconds, prompt_tokens, generated):
        pass

    def tokens(self, n, inter_token_seconds):
        pass

TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0]
ITL_BUCKETS = [0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5]


class TritonMetrics:
    def __init__(self, pb_utils, labels: dict[str, str]):
        MF = pb_utils.MetricFamily
        fam = lambda name, desc, kind: MF(name=name, description=desc, kind=kind)  # noqa: E731
        self._families = [
            fam("llm_num_requests_waiting", "Requests waiting for a KV slot", MF.GAUGE),
            fam("llm_num_requests_running", "Requests holding a KV slot (prefill or decode)", MF.GAUGE),
            fam("llm_kv_cache_usage_ratio", "Fraction of KV cache positions in use", MF.GAUGE),
            fam("llm_prompt_tokens_total", "Prompt tokens processed", MF.COUNTER),
            fam("llm_generation_tokens_total", "Tokens generated", MF.COUNTER),
        ]
        self.waiting, self.running, self.kv, self.prompt, self.gen = (f.Metric(labels=labels) for f in self._families)
        self.ttft = self.itl = None
        if hasattr(MF, "HISTOGRAM"):
            h1 = fam("llm_time_to_first_token_seconds", "Time to first token", MF.HISTOGRAM)
            h2 = fam("llm_inter_token_latency_seconds", "Time between tokens of a sequence", MF.HISTOGRAM)
            self._families += [h1, h2]
            self.ttft = h1.Metric(labels=labels, buckets=TTFT_BUCKETS)
            self.itl = h2.Metric(labels=labels, buckets=ITL_BUCKETS)

    def state(self, waiting: int, running: int, kv_usage: float) -> None:
        self.waiting.set(waiting)
        self.running.set(running)
        self.kv.set(kv_usage)

    def first_token(self, seconds: float, prompt_tokens: int, generated: int) -> None:
        self.prompt.increment(prompt_tokens)
        if generated:
            self.gen.increment(generated)
        if self.ttft is not None:
            self.ttft.observe(seconds)

    def tokens(self, n: int, inter_token_seconds: list[float]) -> None:
        self.gen.increment(n)
        if self.itl is not None:
            for s in inter_token_seconds:
                self.itl.observe(s)
