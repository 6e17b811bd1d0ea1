"""From the parser's namespace to settings objects: what the stages and the outputs read instead of ``args``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields

import torch

import util
from model.reranker import rerank_kernel

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation settings

# What "auto" picks per device type (docs/reranker_speed.md). One-line switches, flipped only on GPU measurements.
AUTO_RERANK_KERNEL = {"cpu": "stage0", "cuda": "plain"}
AUTO_IMAGE_DECODER = {"cpu": "pil", "cuda": "pil"}


@dataclass
class EvalSettings:
    """How one split is evaluated: extraction, store, search and reranking. eval_settings builds it from the flags
    of the same names (parser.py, where each is explained); the defaults here serve code that builds it without a
    parser (tests, benchmarks)."""

    image_size: tuple[int, int]  # (H, W), from --resize
    device: torch.device
    precision: str = "fp32"
    infer_batch_size: int = 32
    num_workers: int = 2
    rerank_top: int = 100
    rerank_batch_size: int = 2
    rerank_fusion: float = 0.0
    recall_values: list[int] = field(default_factory=lambda: [1, 5, 10, 20, 100])
    preprocessing: str = "pil"  # or "reference": the reference's test-time function (places.images.load_image)
    rerank_kernel: str = "plain"  # a name of model.reranker.RERANK_KERNELS ("auto" resolved by eval_settings)
    rerank_cuda_graphs: bool = False  # replay the reranker as a CUDA graph per batch shape (CUDA only)
    store_tier: str = "auto"  # feature_store.TIERS or "auto"
    store_dtype: str = "float16"
    image_decoder: str = "pil"  # places.images.IMAGE_DECODERS ("auto" resolved by eval_settings)
    faiss_index: str | None = None  # index-factory string for approximate search; None: exact
    faiss_nprobe: int = 32
    faiss_train_size: int = 100_000


# EvalSettings fields that do not come from the flag of the same name
_DERIVED_EVAL_FIELDS = ("image_size", "device", "rerank_kernel", "image_decoder")


def eval_settings(args, device: torch.device) -> EvalSettings:
    """EvalSettings from the evaluation flags (shared with train_reranking.py's validation), field by field; "auto"
    resolved for the device. A fused kernel on the CPU is refused here, before any work."""
    kernel = rerank_kernel(resolve_auto(args.rerank_kernel, AUTO_RERANK_KERNEL, device))
    if kernel.fused and device.type != "cuda":
        raise util.PRGSError(
            f"--rerank_kernel {kernel.name} runs on CUDA only (device {device}); use stage0 (or plain) on the CPU"
        )
    if args.rerank_cuda_graphs and device.type != "cuda":
        logger.warning("--rerank_cuda_graphs has no effect on device %s (CUDA only)", device)
    # the reference's preprocessing resizes normalised pixels: only the PIL workers compute it (parser.py refuses
    # an explicit --image_decoder torchvision with it)
    image_decoder = "pil" if args.preprocessing == "reference" else args.image_decoder
    flags = {f.name: getattr(args, f.name) for f in fields(EvalSettings) if f.name not in _DERIVED_EVAL_FIELDS}
    return EvalSettings(
        image_size=tuple(args.resize),
        device=device,
        rerank_kernel=kernel.name,
        image_decoder=resolve_auto(image_decoder, AUTO_IMAGE_DECODER, device),
        **flags,
    )


def resolve_auto(value: str, auto: dict[str, str], device: torch.device) -> str:
    """``value``, or what ``auto`` picks for the device type when it is "auto"."""
    return auto[device.type] if value == "auto" else value


@dataclass
class OutputOptions:
    """What outputs.py writes beside results.json and predictions.csv, from the flags of the same names (parser.py);
    the defaults (nothing pictured) serve an entry point without those flags and code without a parser."""

    dataset_name: str
    num_preds_to_save: int = 0  # pictures of the global and reranked top N per pictured query
    num_queries_to_save: int = 0  # how many queries get pictures, spread evenly; 0: every query
    save_only_wrong_preds: bool = False  # pictures only of queries whose reranked top-1 is wrong
    rerank_pictures: int = 0  # test.py: pictures of the cross graph's matches for the reranked top N


def output_options(args) -> OutputOptions:
    """OutputOptions from the flags of the same names, field by field (a flag the entry point lacks keeps the
    default)."""
    return OutputOptions(**{f.name: getattr(args, f.name) for f in fields(OutputOptions) if hasattr(args, f.name)})
