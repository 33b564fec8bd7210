"""One export, start to finish: validate, build, verify, publish.

The CLI and `stack.default_model` both call `run_export`; it raises on any failure
and then leaves no version directory behind.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llm_backend.model_config import EngineParams

from . import manifest as mf
from .onnx_build import BuildError, builder_options, run_builder
from .pad_heads import head_dim, padded_head_dim, write_padded_checkpoint
from .publish import publish_version, staging, write_config
from .validate import Checkpoint, validate_checkpoint
from .graph_rewrite import FUSE_SCHEME, fuse_export
from .int4_requant import SCHEME as INT4_SCHEME
from .int4_requant import calibration_ids, requantize
from .w8a8 import SCHEME as W8A8_SCHEME
from .w8a8 import quantize_export

# Precisions we make ourselves from the builder's output: w8a8 is the fp32 graph rewritten.
BUILDER_PRECISION = {"w8a8": "fp32"}
# Checked by `llm-export` as a bad argument (exit 2) and by run_export for other callers.
W8A8_CPU_ONLY = "precision w8a8 targets the CPU (onnxruntime's int8 GEMM): use fp16 or int4 on GPUs"


def requantizes_int4(precision: str, device: str, int4_weights: str = "activation-aware") -> bool:
    """Are the builder's int4 weights quantized again (int4_requant.py)? CPU only: the
    block sizes were chosen with onnxruntime's CPU kernels."""
    return precision == "int4" and device == "cpu" and int4_weights == "activation-aware"


def rewrite_scheme(precision: str, device: str, int4_weights: str = "activation-aware") -> str | None:
    """The rewrite applied after the builder (recorded in the manifest as quantization.scheme)."""
    if precision == "w8a8":
        return W8A8_SCHEME
    if requantizes_int4(precision, device, int4_weights):
        return INT4_SCHEME          # re-quantized, then fused like int8
    if device == "cpu" and precision in ("int4", "int8"):
        return FUSE_SCHEME          # measured on the CPU only
    return None

# Checkpoint files that travel with the artifacts (the backend tokenizes with them).
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "config.json", "generation_config.json")
DEFAULT_MAX_MODEL_LEN = 2048
PROTOBUF_LIMIT = 2 * 1024**3


@dataclass
class ExportOptions:
    name: str
    repository: Path
    precision: str = "fp32"
    device: str = "cpu"
    chat_template_file: Path | None = None
    no_chat_template: bool = False
    max_model_len: int | None = None
    instance_count: int = 1
    skip_verify: bool = False
    verify_tokens: int = 32
    engine_overrides: dict = field(default_factory=dict)   # other EngineParams fields
    builder_options: dict = field(default_factory=dict)    # onnxruntime-genai extra_options
    int4_weights: str = "activation-aware"                 # or "builder": its k_quant, blocks of 32
    int4_mlp_block: int = 64                               # activation-aware: MLP and head blocks (32: batch-invariant)
    quiet: bool = False


@dataclass
class ExportResult:
    model_dir: Path
    version_dir: Path
    manifest: dict
    seconds: float


def progress(opts: ExportOptions, message: str) -> None:
    if not opts.quiet:
        print(f"[llm-export] {message}", flush=True)


def instance_kind(device: str) -> str:
    return "KIND_GPU" if device == "cuda" else "KIND_CPU"


def engine_params(ckpt: Checkpoint, opts: ExportOptions) -> EngineParams:
    """config.pbtxt parameters for this export."""
    ctx = ckpt.context_length
    limit = opts.max_model_len or DEFAULT_MAX_MODEL_LEN
    params = EngineParams(precision=opts.precision, device=opts.device,
                          chat_template=ckpt.chat_template or "", bos_token=ckpt.bos_token,
                          eos_token=ckpt.eos_token, context_length=ctx,
                          max_model_len=min(ctx, limit) if ctx else limit)
    return apply_overrides(params, opts.engine_overrides)


def apply_overrides(params: EngineParams, overrides: dict) -> EngineParams:
    known = set(params.__dict__)
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(f"unknown engine parameter {key!r}; known: {', '.join(sorted(known))}")
        setattr(params, key, type(getattr(params, key))(value))
    return params


def stage_files(ckpt: Checkpoint, version_dir: Path) -> None:
    """Copy the checkpoint's tokenizer/config files and the chat template next to the ONNX model."""
    own_fast_tokenizer = (ckpt.path / "tokenizer.json").is_file()
    for name in CARRIED_FILES:
        if name == "tokenizer_config.json" and not own_fast_tokenizer:
            continue  # keep the builder's, written together with the tokenizer.json it converted
        if (ckpt.path / name).is_file():
            shutil.copy2(ckpt.path / name, version_dir / name)
    template = version_dir / "chat_template.jinja"
    if ckpt.chat_template is not None:
        template.write_text(ckpt.chat_template)
    elif template.exists():
        template.unlink()  # --no-chat-template: the builder's copy must not sneak in
    if not (version_dir / "tokenizer.json").is_file():
        raise BuildError(f"no tokenizer.json for the backend: {ckpt.path} has none and the builder did "
                         "not write one; save the tokenizer with tokenizer.save_pretrained")


def check_artifacts(version_dir: Path) -> dict:
    """The builder must keep weights in external data once the graph would pass protobuf's 2 GB."""
    graph = (version_dir / "model.onnx").stat().st_size
    data = version_dir / "model.onnx.data"
    if graph >= PROTOBUF_LIMIT:
        raise BuildError(f"{version_dir / 'model.onnx'} is {graph / 1e9:.2f} GB with weights inside; "
                         "ONNX needs external data above 2 GB")
    return {"model_onnx_bytes": graph, "external_data_bytes": data.stat().st_size if data.exists() else 0}


def _verify(ckpt: Checkpoint, version_dir: Path, opts: ExportOptions, verifier) -> dict:
    if opts.skip_verify:
        return {"status": "skipped", "reason": "--skip-verify given: NOT verified against the source model"}
    if verifier is None:
        from .verify import verify_export as verifier
    try:
        return verifier(ckpt, version_dir, opts)
    except Exception as err:  # a model that cannot even run has failed verification
        return {"status": "failed", "reason": f"the verification could not run: {type(err).__name__}: {err}"}


def requantize_int4(ckpt: Checkpoint, source: Path, stage: Path, version_dir: Path,
                    opts: ExportOptions) -> dict:
    """int4 on the CPU: the weights again, activation-aware, from an fp32 build of the same
    checkpoint (int4_requant.py); then gate and up fused as for int8."""
    if opts.int4_mlp_block not in (32, 64):
        raise BuildError(f"int4_mlp_block must be 32 or 64, got {opts.int4_mlp_block}")
    reference = stage / "fp32-reference"
    progress(opts, "int4: building an fp32 reference graph for activation-aware quantization")
    run_builder(source, reference, "fp32", opts.device, stage / "builder-fp32.log", opts.builder_options)
    progress(opts, f"int4: quantizing the weights again (activation-aware k-quant, MLP and head in blocks "
                   f"of {opts.int4_mlp_block}, attention 32)")
    try:
        stats = requantize(version_dir, reference, calibration_ids(ckpt, version_dir / "tokenizer.json"),
                           opts.int4_mlp_block)
    except ValueError as err:   # a graph this quantizer does not expect
        raise BuildError(f"int4 activation-aware quantization failed: {err}; --int4-weights builder keeps "
                         "the model builder's int4 weights") from err
    shutil.rmtree(reference, ignore_errors=True)
    return {**stats, **fuse_export(version_dir), "scheme": INT4_SCHEME}


def run_export(checkpoint: Path, opts: ExportOptions, verifier=None) -> ExportResult:
    """Validate, build, verify (with `verifier`, default export.verify) and publish.

    Raises on failure; nothing is published then."""
    start = time.monotonic()
    progress(opts, f"validating {checkpoint}")
    if opts.precision == "w8a8" and opts.device != "cpu":
        raise BuildError(W8A8_CPU_ONLY)
    ckpt = validate_checkpoint(checkpoint, opts.chat_template_file, opts.no_chat_template)
    params = engine_params(ckpt, opts)
    model_dir = Path(opts.repository) / opts.name
    with staging(model_dir) as stage:
        version_dir = stage / "version"
        progress(opts, f"exporting {ckpt.architecture} to ONNX ({opts.precision}, {opts.device}) ...")
        requant = requantizes_int4(opts.precision, opts.device, opts.int4_weights)
        extra = builder_options(opts.precision, opts.builder_options, requantized=requant)
        source, padding = ckpt.path, None
        if padded_head_dim(ckpt.config):
            padding = {"head_dim": head_dim(ckpt.config), "exported_head_dim": padded_head_dim(ckpt.config)}
            progress(opts, f"head size {padding['head_dim']} is not a multiple of 16 (GroupQueryAttention): "
                           f"exporting an exactly equivalent model with head size {padding['exported_head_dim']}")
            source = stage / "padded-checkpoint"
            write_padded_checkpoint(ckpt.path, ckpt.weight_files, ckpt.config, source)
        build_s = run_builder(source, version_dir, BUILDER_PRECISION.get(opts.precision, opts.precision),
                              opts.device, stage / "builder.log", extra)
        progress(opts, f"exported in {build_s:.1f} s")
        stage_files(ckpt, version_dir)
        quantization = None
        scheme = rewrite_scheme(opts.precision, opts.device, opts.int4_weights)
        if scheme == W8A8_SCHEME:
            progress(opts, "quantizing to W8A8 (int8 weights per column, int8 activations per row)")
            quantization = quantize_export(version_dir)
        elif scheme == INT4_SCHEME:
            quantization = requantize_int4(ckpt, source, stage, version_dir, opts)
        elif scheme == FUSE_SCHEME:
            quantization = fuse_export(version_dir)
        sizes = check_artifacts(version_dir)
        progress(opts, "computing the source weights checksum")
        checksum = mf.weights_checksum(ckpt.weight_files)
        verification = _verify(ckpt, version_dir, opts, verifier)
        if verification.get("status") == "failed":
            raise VerificationFailed(verification)
        manifest = {
            "name": opts.name,
            "source": {"path": str(ckpt.path.resolve()), "architecture": ckpt.architecture,
                       "weights": checksum, "chat_template": ckpt.chat_template_source},
            "precision": opts.precision,
            "device": opts.device,
            "verification": verification,
            "engine_params": asdict(params),
            "instance_kind": instance_kind(opts.device),
            "instance_count": opts.instance_count,
            "artifacts": sorted(p.name for p in version_dir.iterdir()),
            "builder_options": extra,
            "quantization": quantization,
            "sizes": sizes,
            "head_padding": padding,
            "build_seconds": round(build_s, 1),
            "tools": mf.tool_versions(),
            "date": mf.now_utc(),
        }
        mf.write_manifest(version_dir / "manifest.json", manifest)
        write_config(model_dir, opts.name, params, instance_kind=instance_kind(opts.device),
                     instance_count=opts.instance_count)
        published = publish_version(version_dir, model_dir)
    progress(opts, f"published {published}")
    return ExportResult(model_dir, published, manifest, time.monotonic() - start)


class VerificationFailed(RuntimeError):
    def __init__(self, verification: dict):
        super().__init__(verification.get("reason", "verification failed"))
        self.verification = verification
