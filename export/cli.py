"""`llm-export`: a Hugging Face checkpoint becomes a verified Triton model directory.

Writes REPO_DIR/NAME/config.pbtxt (backend "llm", decoupled, dynamic batching) and
the next numbered version REPO_DIR/NAME/N/: model.onnx + model.onnx.data,
genai_config.json, tokenizer files, chat template, config.json,
generation_config.json and manifest.json (source checksum, precision,
verification figures, tool versions, date).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EPILOG = """\
steps:
  1. validate   config.json (Llama, Mistral or Qwen2 architecture), weights
                (safetensors, sharded safetensors with index, or pytorch_model*.bin)
                consistent with the config, tokenizer (tokenizer.json or an equivalent
                that loads) with tokenizer_config.json and special tokens that agree with
                config.json / generation_config.json, chat template.
  2. export     onnxruntime-genai's model builder: decoder with KV cache; models over
                2 GB keep their weights in external data (model.onnx.data).
  3. verify     against the source model (transformers, fp32, CPU): last-position logits
                of 3 prompts (max abs diff, KL divergence, top-1) and greedy decoding of
                --verify-tokens tokens from each (count of leading tokens that agree).
                To pass:  fp32  max abs diff <= 1e-3 x logit scale, every greedy token
                          int8  KL <= 0.1 nats, top-1, first 4 greedy tokens
                          w8a8  KL <= 0.1 nats, top-1, first 4 greedy tokens
                          int4  KL <= 1.0 nats, top-1, first greedy token
                          fp16  max abs diff <= 2e-2 x logit scale, first 8 tokens
                Quantized weights move unlikely logits a lot without changing the
                choice, so they are judged on the distribution and the choice. A
                choice the source scores within 3 % of the logit scale of its best is
                a near tie, not an error. Exports for --device cuda cannot run with
                the CPU onnxruntime here: their verification is recorded as
                "skipped" in the manifest and the summary.
  4. publish    config.pbtxt is rendered, then the staged version directory is renamed
                to the next number (1, 2, ...) in one atomic step. Any failure publishes
                nothing and exits non-zero.

precisions:   cpu: fp32 (exact); w8a8 (int8 weights and int8 activations per row: the
                   fastest on the CPU); int4 (weight-only MatMulNBits, quantized again
                   activation-aware: see --int4-weights; the fastest single stream);
                   int8 (weight-only MatMulNBits)
              cuda: fp16, int4 (also fp32, int8)

exit codes:   0 published, 2 invalid checkpoint or arguments, 3 export failed,
              4 verification failed
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-export", description=__doc__.split("\n", 1)[1],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT_DIR",
                   help="Hugging Face checkpoint directory (config.json, weights, tokenizer files)")
    p.add_argument("--name", required=True, help="model name: the directory under --repository and the Triton model name")
    p.add_argument("--repository", required=True, type=Path, metavar="REPO_DIR",
                   help="Triton model repository (created if missing)")
    p.add_argument("--precision", choices=["fp32", "w8a8", "int4", "fp16", "int8"], default="fp32",
                   help="weight precision (default fp32)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="target execution provider; sets instance kind KIND_CPU/KIND_GPU (default cpu)")
    tmpl = p.add_mutually_exclusive_group()
    tmpl.add_argument("--chat-template", type=Path, metavar="FILE",
                      help="use this Jinja chat template instead of the checkpoint's")
    tmpl.add_argument("--no-chat-template", action="store_true",
                      help="export without a chat template (base models; chat requests will be refused)")
    p.add_argument("--max-model-len", type=int, metavar="N",
                   help="tokens per sequence, prompt + output (default min(context length, 2048))")
    p.add_argument("--max-num-seqs", type=int, metavar="N", help="sequences decoded together (KV slots)")
    p.add_argument("--max-queue-size", type=int, metavar="N", help="requests waiting for a slot before 'over capacity'")
    p.add_argument("--instance-count", type=int, default=1, metavar="N", help="Triton model instances (default 1)")
    p.add_argument("--verify-tokens", type=int, default=32, metavar="N",
                   help="greedy tokens compared per prompt during verification (default 32)")
    p.add_argument("--skip-verify", action="store_true",
                   help="publish WITHOUT verification (recorded as skipped in the manifest)")
    p.add_argument("--builder-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra_options for onnxruntime-genai's model builder, repeatable "
                        "(e.g. block_size=16 with --int4-weights builder, for closer int4 parity)")
    p.add_argument("--int4-weights", choices=["activation-aware", "builder"], default="activation-aware",
                   help="CPU int4: quantize the weights again, weighing errors by the activations seen on "
                        "calibration text, in blocks of 64 (MLP, LM head) and 32 (attention) (default); or "
                        "keep the model builder's (k_quant, blocks of 32). CUDA int4 is always the builder's")
    p.add_argument("--int4-mlp-block", type=int, choices=[64, 32], default=64,
                   help="activation-aware int4: block size of the MLP and LM head weights. 64 (default) "
                        "decodes one stream 7-10%% faster; 32 makes a sequence's output bit for bit the same "
                        "whether it is decoded alone or in a batch (with 64 onnxruntime sums one row in "
                        "another order than a batch, and greedy text can part at a near tie)")
    p.add_argument("--quiet", action="store_true", help="no progress lines, only the summary")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.precision == "fp16" and args.device == "cpu":
        parser.error("--precision fp16 targets GPUs: use --device cuda (CPU exports: fp32, w8a8, int8, int4)")
    if args.precision == "w8a8" and args.device != "cpu":
        from .pipeline import W8A8_CPU_ONLY
        parser.error(f"--{W8A8_CPU_ONLY}")
    bad = [o for o in args.builder_option if "=" not in o]
    if bad:
        parser.error(f"--builder-option expects KEY=VALUE, got {bad[0]!r}")
    from .onnx_build import BuildError
    from .pipeline import ExportOptions, VerificationFailed, run_export
    from .summary import print_failure, print_summary
    from .validate import CheckpointError

    overrides = {k: v for k, v in (("max_num_seqs", args.max_num_seqs),
                                   ("max_queue_size", args.max_queue_size)) if v is not None}
    opts = ExportOptions(name=args.name, repository=args.repository, precision=args.precision,
                         device=args.device, chat_template_file=args.chat_template,
                         no_chat_template=args.no_chat_template, max_model_len=args.max_model_len,
                         instance_count=args.instance_count, skip_verify=args.skip_verify,
                         verify_tokens=args.verify_tokens, engine_overrides=overrides, quiet=args.quiet,
                         builder_options=dict(o.split("=", 1) for o in args.builder_option),
                         int4_weights=args.int4_weights, int4_mlp_block=args.int4_mlp_block)
    try:
        result = run_export(args.checkpoint, opts)
    except CheckpointError as err:
        print_failure(f"invalid checkpoint: {err}")
        return 2
    except BuildError as err:
        print_failure(str(err))
        return 3
    except VerificationFailed as err:
        print_failure(f"verification failed: {err}", err.verification)
        return 4
    except KeyboardInterrupt:
        print_failure("interrupted")
        return 130
    print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
