"""The one-screen summary printed at the end of `llm-export`."""

from __future__ import annotations

import sys


def _size(path) -> str:
    total = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return f"{total / 1e6:.1f} MB"


def _verification_lines(v: dict) -> list[str]:
    status = v.get("status", "?")
    if status == "skipped":
        return [f"  verification  SKIPPED: {v.get('reason', '')}"]
    lines = [f"  verification  {status.upper()} ({v.get('criterion', '')})"]
    logits = v.get("logits") or {}
    if logits:
        tol = logits.get("tolerance")
        lines.append(f"    logits      max abs diff {logits['max_abs_diff']:.3g} "
                     f"({'tolerance %.3g' % tol if tol is not None else 'not gated'}, logit scale "
                     f"{logits['logit_scale']:.3g}), KL max {logits['kl_max']:.3g} nats "
                     f"(limit {logits['max_kl']:g}), top-1 agree {logits['top1_agree']}/{logits['prompts']}")
    greedy = v.get("greedy") or {}
    if greedy:
        ties = sum(greedy.get("near_tie_at_divergence") or [])
        lines.append(f"    greedy      agreement {greedy.get('agreed')} per prompt of "
                     f"{greedy.get('tokens')} tokens (required {greedy.get('required')})"
                     + (f", {ties} divergence(s) at a near tie" if ties else ""))
    return lines


def print_summary(result) -> None:
    m = result.manifest
    p = m["engine_params"]
    lines = [
        "",
        f"exported {m['name']} -> {result.version_dir}",
        f"  source        {m['source']['path']} ({m['source']['architecture']})",
        f"  weights sha256 {m['source']['weights']['sha256'][:16]}...",
        f"  precision     {m['precision']} on {m['device']} ({m['instance_kind']} x{m['instance_count']})",
        f"  artifacts     {_size(result.version_dir)} in {len(m['artifacts']) + 1} files",
        f"  limits        max_model_len {p['max_model_len']} (context {p['context_length']}), "
        f"max_num_seqs {p['max_num_seqs']}",
        f"  chat template {m['source']['chat_template']}",
        *([f"  head size     {m['head_padding']['head_dim']} exported as {m['head_padding']['exported_head_dim']} "
           "(zero-padded for GroupQueryAttention: same outputs, larger KV cache)"] if m.get("head_padding") else []),
        *_verification_lines(m["verification"]),
        f"  config        {result.model_dir / 'config.pbtxt'}",
        f"  time          {result.seconds:.1f} s (ONNX build {m['build_seconds']} s)",
    ]
    print("\n".join(lines), flush=True)


def print_failure(message: str, verification: dict | None = None) -> None:
    lines = [f"llm-export: error: {message}"]
    if verification:
        lines += _verification_lines(verification)
    lines.append("nothing was published")
    print("\n".join(lines), file=sys.stderr, flush=True)
