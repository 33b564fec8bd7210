"""Verify an exported ONNX decoder against its source model before publishing.

The reference is the checkpoint loaded with transformers (fp32, CPU). Two checks:

- logits parity: last-position logits of a few prompts, max abs difference
  against a tolerance relative to the logit scale (the largest |logit| seen);
- greedy agreement: both models decode greedily (EOS ignored) from each prompt;
  we count how many leading tokens agree. Where they part, the source saw the
  same prefix: if it scores the ONNX model's choice within the tolerance of its
  own (a near tie), the divergence is not held against the export.

Criteria per precision (see CRITERIA): fp32 must match greedily token for token
and its logits within 1e-3 of the logit scale. Quantized weights change the
logits by design: for them the next-token distributions must stay close (KL),
the top-1 choice must agree and the first greedy tokens too; later tokens may
drift coherently (a near tie flips one token and the sequences part).
Targets for CUDA cannot run here: they are reported as skipped, never as passed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]
CHAT_PROMPT = "Write a short sentence about the sea."


@dataclass(frozen=True)
class Criterion:
    rel_tol: float | None   # max |logit diff| as a fraction of the logit scale (None: reported only)
    max_kl: float           # max KL(source || onnx) of the next-token distribution, nats, per prompt
    min_greedy: int | None  # leading greedy tokens that must agree per prompt (None = all)

    def describe(self) -> str:
        parts = []
        if self.rel_tol is not None:
            parts.append(f"max abs logit diff <= {self.rel_tol:g} x logit scale")
        parts.append(f"KL <= {self.max_kl:g} nats")
        parts.append("top-1 agrees (or is a near tie) on every prompt")
        parts.append("all greedy tokens agree" if self.min_greedy is None
                     else f"first {self.min_greedy} greedy tokens agree")
        return ", ".join(parts) + " (a greedy divergence at a near tie of the source is no error)"


# Measured on SmolLM2-135M (the default model): fp32 max abs diff ~5e-5 at logit
# scale 34, 32/32 greedy tokens; int8 KL <= 0.015, greedy 12-32 tokens; w8a8 KL
# 0.03-0.06, greedy 5-27 tokens; int4
# (k_quant) KL <= 0.75, greedy 1-6 tokens. Quantization moves the low-probability
# tail of the logits a lot without changing the choice, so quantized exports are
# gated on the distribution (KL) and the choice (top-1, first greedy tokens) instead
# of the max abs difference, which is still reported.
CRITERIA = {
    "fp32": Criterion(rel_tol=1e-3, max_kl=1e-3, min_greedy=None),
    "fp16": Criterion(rel_tol=2e-2, max_kl=1e-2, min_greedy=8),
    "int8": Criterion(rel_tol=None, max_kl=0.1, min_greedy=4),
    "w8a8": Criterion(rel_tol=None, max_kl=0.1, min_greedy=4),
    "int4": Criterion(rel_tol=None, max_kl=1.0, min_greedy=1),
}
# A choice the source scores within this fraction of the logit scale of its own best
# is a near tie, not an error (1.0 logit on SmolLM2, whose scale is 34).
NEAR_TIE = 0.03


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray):
    """KL(softmax(ref) || softmax(logits)) in nats over the last axis: a float for one
    vector of logits, an array for several ([positions, vocab])."""
    def log_softmax(x):
        x = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)
    return float(kl) if kl.ndim == 0 else kl


def _progress(opts, message: str) -> None:
    if not getattr(opts, "quiet", False):
        print(f"[llm-export] {message}", flush=True)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def whole_sequence_feed(input_names: list[str], decoder: dict, ids: list[int]) -> dict:
    """Inputs of the builder's decoder graph for `ids` as one sequence with no past
    (batch 1; `decoder` is genai_config.json's model.decoder): every position's logits
    and activations in one call."""
    past = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32)
    feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    if "position_ids" in input_names:
        feed["position_ids"] = np.arange(len(ids), dtype=np.int64)[None, :]
    feed.update({name: past for name in input_names if name.startswith("past_key_values.")})
    return feed


class ProviderUnavailable(RuntimeError):
    """The target device's execution provider cannot run on this machine."""


class OnnxDecoder:
    """Plain onnxruntime session over the builder's decoder (batch 1, KV cache), on the
    export's target device."""

    def __init__(self, version_dir: Path, device: str = "cpu"):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ProviderUnavailable(f"onnxruntime {ort.__version__} here has no CUDA execution provider")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]

        cfg = json.loads((version_dir / "genai_config.json").read_text())["model"]["decoder"]
        so = ort.SessionOptions()
        # The default thread count was 1.5-1.8x slower here (runtime notes).
        so.intra_op_num_threads = _cores()
        # Spin-waiting threads halved step speed on these shared machines (the engine found the same).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(version_dir / cfg.get("filename", "model.onnx")), so,
                                            providers=providers)
        if self.session.get_providers()[0] != providers[0]:   # onnxruntime-gpu on a machine without a GPU
            raise ProviderUnavailable(f"onnxruntime could not start {providers[0]} here")
        self.layers = cfg["num_hidden_layers"]
        self.kv_heads = cfg["num_key_value_heads"]
        self.head = cfg["head_size"]
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.names = set(inputs)
        self.kv_dtype = np.float16 if inputs["past_key_values.0.key"].type == "tensor(float16)" else np.float32

    def run(self, ids: list[int], past: dict | None, total: int):
        feed = {"input_ids": np.array([ids], dtype=np.int64),
                "attention_mask": np.ones((1, total), dtype=np.int64)}
        if "position_ids" in self.names:
            feed["position_ids"] = np.arange(total - len(ids), total, dtype=np.int64)[None, :]
        if past is None:
            empty = np.zeros((1, self.kv_heads, 0, self.head), dtype=self.kv_dtype)
            past = {f"past_key_values.{i}.{kv}": empty for i in range(self.layers) for kv in ("key", "value")}
        feed.update(past)
        outs = self.session.run(None, feed)
        names = [o.name for o in self.session.get_outputs()]
        result = dict(zip(names, outs))
        present = {f"past_key_values.{i}.{kv}": result[f"present.{i}.{kv}"]
                   for i in range(self.layers) for kv in ("key", "value")}
        return result["logits"][0, -1].astype(np.float32), present

    def greedy(self, prompt: list[int], n: int) -> tuple[np.ndarray, list[int]]:
        logits, past = self.run(prompt, None, len(prompt))
        first, out = logits, []
        for _ in range(n):
            tok = int(np.argmax(logits))
            out.append(tok)
            if len(out) == n:
                break
            logits, past = self.run([tok], past, len(prompt) + len(out))
        return first, out


class TorchDecoder:
    """The source model in transformers, fp32 on the CPU."""

    def __init__(self, checkpoint: Path):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        torch.set_num_threads(_cores())
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()

    def greedy(self, prompt: list[int], n: int) -> tuple[list[np.ndarray], list[int]]:
        """Logits before each greedy step, and the tokens chosen."""
        torch = self.torch
        steps, tokens = [], []
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([prompt]), use_cache=True)
            while True:
                steps.append(out.logits[0, -1].float().numpy().copy())
                tokens.append(int(np.argmax(steps[-1])))
                if len(tokens) == n:
                    return steps, tokens
                out = self.model(input_ids=torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True)


def greedy_agreement(ref_steps: list[np.ndarray], ref_tokens: list[int], tokens: list[int],
                     tie: float) -> tuple[int, bool]:
    """(leading tokens that agree, whether the first difference is a near tie in the source).

    At the first difference both models saw the same prefix; if the source scores
    the other model's choice within `tie` of its own, the two are equally right.
    """
    for i, (a, b) in enumerate(zip(ref_tokens, tokens)):
        if a != b:
            return i, bool(ref_steps[i][b] >= ref_steps[i][a] - tie)
    return len(ref_tokens), False


def _hf_prompts(ckpt, messages) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ckpt.path))
    prompts = [tok(p, add_special_tokens=True)["input_ids"] for p in PROMPTS]
    if ckpt.chat_template:
        text = tok.apply_chat_template(messages, chat_template=ckpt.chat_template, tokenize=False,
                                       add_generation_prompt=True)
        prompts.append(tok(text, add_special_tokens=False)["input_ids"])
    return prompts


def _plain_prompts(ckpt, version_dir: Path, messages) -> list[list[int]]:
    """The exported tokenizer.json and plain Jinja, for tokenizers transformers cannot name."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
    prompts = [tok.encode(p, add_special_tokens=True).ids for p in PROMPTS]
    if ckpt.chat_template:
        text = ckpt.render_chat(messages, add_generation_prompt=True)
        prompts.append(tok.encode(text, add_special_tokens=False).ids)
    return prompts


def prompt_ids(ckpt, version_dir: Path) -> list[list[int]]:
    """Token ids of the verification prompts (one through the chat template when there is one)."""
    messages = [{"role": "user", "content": CHAT_PROMPT}]
    try:
        prompts = _hf_prompts(ckpt, messages)
    except Exception:  # e.g. a tokenizer_class this transformers does not know
        prompts = _plain_prompts(ckpt, version_dir, messages)
    return [p for p in prompts if p]


def fit_context(prompts: list[list[int]], n: int, context: int) -> tuple[list[list[int]], int]:
    """Shorten prompts and the greedy run so both fit a small context (tiny test models)."""
    if not context:
        return prompts, n
    n = max(1, min(n, context // 2))
    return [p[-(context - n):] for p in prompts], n


def verify_export(ckpt, version_dir: Path, opts) -> dict:
    """Compare the staged ONNX model with the source; a dict for the manifest."""
    # A CUDA graph (fp16, GPU-only kernels) is verified on the GPU, where onnxruntime-gpu
    # runs it (the first run on an H200 passed this way); elsewhere it cannot run, and a
    # CPU run of something else would prove nothing.
    try:
        onnx = OnnxDecoder(version_dir, opts.device)
    except ProviderUnavailable as err:
        return {"status": "skipped",
                "reason": f"target device {opts.device} ({opts.precision}) cannot run here ({err}); NOT "
                          "verified. Verify on the target GPU before serving."}
    crit = CRITERIA[opts.precision]
    n = opts.verify_tokens
    start = time.monotonic()
    _progress(opts, "verifying: loading the source model with transformers (fp32, CPU)")
    ref = TorchDecoder(ckpt.path)
    prompts, n = fit_context(prompt_ids(ckpt, version_dir), n, ckpt.context_length)
    _progress(opts, f"verifying: {len(prompts)} prompts, {n} greedy tokens each")
    runs = [(ref.greedy(p, n), onnx.greedy(p, n)) for p in prompts]
    del ref
    scale = max(max(float(np.max(np.abs(r[0][0]))) for r, _ in runs), 1.0)
    tol = crit.rel_tol * scale if crit.rel_tol is not None else None
    tie = tol if tol is not None else NEAR_TIE * scale
    diffs, kls, top1, agreed, ties = [], [], 0, [], []
    for (ref_steps, ref_tokens), (onnx_logits, onnx_tokens) in runs:
        ref_logits = ref_steps[0]
        diffs.append(float(np.max(np.abs(ref_logits - onnx_logits))))
        kls.append(kl_divergence(ref_logits, onnx_logits))
        top1 += int(ref_logits[int(np.argmax(onnx_logits))] >= ref_logits.max() - NEAR_TIE * scale)
        count, is_tie = greedy_agreement(ref_steps, ref_tokens, onnx_tokens, tie)
        agreed.append(count)
        ties.append(is_tie)
    required = n if crit.min_greedy is None else min(crit.min_greedy, n)
    failures = []
    if tol is not None and max(diffs) > tol:
        failures.append(f"max abs logit diff {max(diffs):.4g} exceeds {tol:.4g}")
    if max(kls) > crit.max_kl:
        failures.append(f"KL divergence {max(kls):.4g} nats exceeds {crit.max_kl:g}")
    if top1 < len(prompts):
        failures.append(f"top-1 token differs on {len(prompts) - top1} of {len(prompts)} prompts")
    if any(a < required and not t for a, t in zip(agreed, ties)):
        failures.append(f"greedy agreement {agreed} below the required {required} tokens")
    result = {
        "status": "failed" if failures else "passed",
        "criterion": crit.describe(),
        "logits": {"prompts": len(prompts), "max_abs_diff": max(diffs), "per_prompt": diffs,
                   "logit_scale": scale, "tolerance": tol, "kl_max": max(kls), "kl_per_prompt": kls,
                   "max_kl": crit.max_kl, "top1_agree": top1},
        "greedy": {"tokens": n, "agreed": agreed, "required": required,
                   "near_tie_at_divergence": ties, "tie_margin": tie},
        "seconds": round(time.monotonic() - start, 1),
        "execution_provider": onnx.session.get_providers()[0],
    }
    if failures:
        result["reason"] = "; ".join(failures)
    else:
        result["probes"] = probes(version_dir, prompts, [t for _, (_, t) in runs], n, required)
    _progress(opts, f"verification {result['status']} in {result['seconds']} s")
    return result


def probes(version_dir: Path, prompts: list[list[int]], outputs: list[list[int]], n: int, match: int) -> dict:
    """What `llm-deploy promote` checks before a version takes traffic: the exported
    model's own greedy answers (EOS ignored) to the verification prompts, as the served
    text must begin: all `n` tokens for fp32, the first `match` tokens of a quantized
    export (its later tokens may part at near ties, as verification allows)."""
    from tokenizers import Tokenizer

    from llm_backend.detokenizer import IncrementalDetokenizer

    tok = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
    cases = []
    for prompt, tokens in zip(prompts, outputs):
        detok = IncrementalDetokenizer(tok, prompt)  # as the engine turns tokens into text
        prefix = "".join(detok.push(t) for t in tokens[:match])
        cases.append({"prompt_ids": prompt, "tokens": tokens, "expected_prefix": prefix})
    return {"max_tokens": n, "match_tokens": match, "cases": cases}
