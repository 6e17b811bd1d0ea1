"""From the parser's namespace to settings: presets, the model-flag table, the checks of flags against a checkpoint,
the preprocessing and image-decoder choice, resume detection and which flags a resume may change.

Model flags left unset are filled, in this order, from the checkpoint given with --resume (this project's
checkpoints carry their configuration), then from the dataset's preset: the built-in toy world uses a small DeiT at
a low resolution so it runs on a CPU; every other dataset uses the reference's settings (DeiT-S distilled, 480x640,
1000 of 1200 nodes kept, top-100 reranking). parser.py defines the flags and calls the ``complete_*_args``
functions here after parsing; this module never imports the parser, the evaluation or the training.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

import util
from model.backbone import patch_grid
from model.checkpoint import CheckpointError, open_checkpoint
from model.network import ModelConfig
from model.precision import StagePrecisions, cpu_has_native_bf16, resolve_precision, resolve_stage_precisions
from model.reranker import num_regions, rerank_kernel
from places.folders import FOLDERS_NAME
from retrievers import OWN_MODEL, GlobalModelError, GlobalModelSpec, global_model_spec

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Presets: the model flags' defaults are ModelConfig's (the reference's settings); a preset changes some of them, and
# sets the batch sizes and the shortlist length, per dataset.

REFERENCE_PRESET = dict(rerank_top=100, infer_batch_size=32, rerank_batch_size=2)
TOY_WORLD_PRESET = dict(
    backbone="deit_micro",
    resize=(144, 192),
    local_dim=32,
    input_norm="per_image",
    local_head_init="xavier",
    rerank_top=20,
    infer_batch_size=32,
    rerank_batch_size=8,
)
PRESETS = {"toy_world": TOY_WORLD_PRESET}  # by --dataset_name; every other dataset gets REFERENCE_PRESET

# ----------------------------------------------------------------------------------------------------------------
# The model-flag table: one flag per ModelConfig field, named as the field except where FLAG_OF_FIELD says otherwise.

FLAG_OF_FIELD = {"image_size": "resize"}
FIELDS_WITHOUT_FLAG = ("finetune_backbone",)  # set by the training stage, never from the command line
_MODEL_FIELDS = {field.name: field for field in dataclasses.fields(ModelConfig)}
MODEL_FLAGS: dict[str, str] = {
    FLAG_OF_FIELD.get(name, name): name for name in _MODEL_FIELDS if name not in FIELDS_WITHOUT_FLAG
}  # flag -> ModelConfig field
MODEL_DEFAULTS = {flag: _MODEL_FIELDS[field].default for flag, field in MODEL_FLAGS.items()}  # num_kept_nodes None
# A checkpoint's configuration fixes every model flag but these two: the input size may differ from the one the model
# was built for (positional embeddings are fitted) as long as the region count fits, and local_head_init only
# initialises a fresh local_head.
CHECKPOINT_FREE_FLAGS = ("resize", "local_head_init")
CHECKPOINT_FLAGS = tuple(flag for flag in MODEL_FLAGS if flag not in CHECKPOINT_FREE_FLAGS)


def preset_text(flag: str) -> str:
    """The presets' values of ``flag`` for its --help, e.g. "Preset: 480 640; 144 192 for the toy world"."""
    reference = dict(MODEL_DEFAULTS, **REFERENCE_PRESET)[flag]
    parts = [_value_text(reference)] + [
        f"{_value_text(preset[flag])} for the {name.replace('_', ' ')}"
        for name, preset in PRESETS.items()
        if preset.get(flag, reference) != reference
    ]
    return "Preset: " + "; ".join(parts)


def auto_text(auto: dict[str, str]) -> str:
    """A per-device table of 'auto' choices for --help: {"cpu": "a", "cuda": "b"} -> "a on the CPU, b on CUDA" (or
    "a" when both agree)."""
    if len(set(auto.values())) == 1:
        return next(iter(auto.values()))
    return f"{auto['cpu']} on the CPU, {auto['cuda']} on CUDA"


def _value_text(value) -> str:
    """A flag's value as typed on the command line: (480, 640) -> "480 640"."""
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def model_config_from_args(args: argparse.Namespace, image_size: tuple[int, int]) -> ModelConfig:
    """The ModelConfig the model flags describe, built for ``image_size`` (fields without a flag keep their
    defaults)."""
    values = {field: getattr(args, flag) for flag, field in MODEL_FLAGS.items()}
    return ModelConfig(**dict(values, image_size=tuple(image_size)))


def checkpoint_model_flags(args: argparse.Namespace, checkpoint_config: ModelConfig) -> dict:
    """The model flags (CHECKPOINT_FLAGS) a checkpoint's configuration fixes, by flag name. Raises ValueError when a
    given flag contradicts one."""
    fixed = {flag: getattr(checkpoint_config, MODEL_FLAGS[flag]) for flag in CHECKPOINT_FLAGS}
    for name, value in fixed.items():
        given = getattr(args, name, None)
        if given is not None and given != value:
            raise ValueError(
                f"--{name} {given} conflicts with the checkpoint {args.resume}, which was trained with "
                f"{name}={value}; leave the flag out to use the checkpoint's value"
            )
    return fixed


def _open_resumed_checkpoint(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The checkpoint of --resume, opened (its configuration read); a missing or unreadable file stops the parser."""
    if Path(args.resume).is_dir():
        parser.error(f"--resume {args.resume} is a folder; expected a checkpoint file, e.g. {args.resume}/last.pth")
    if not Path(args.resume).is_file():
        parser.error(f"--resume {args.resume}: file not found")
    try:
        return open_checkpoint(args.resume)
    except CheckpointError as error:
        parser.error(f"--resume {args.resume}: {error}")


def apply_presets(args: argparse.Namespace, parser: argparse.ArgumentParser, reranks: bool = True) -> None:
    """Fill unset model/runtime flags from the checkpoint's configuration, then the dataset preset, and validate.

    Sets args.model_config: the network to build. Its image size is the checkpoint's (this project's files record
    it; the reference's files were all made at 480x640), while --resize is the input size, which may differ
    (positional embeddings are fitted) as long as the reranker gets the same region count (``reranks``).
    """
    from_checkpoint, built_size = {}, None
    if getattr(args, "resume", None):
        checkpoint_config = _open_resumed_checkpoint(args, parser).model_config
        built_size = tuple(checkpoint_config.image_size) if checkpoint_config else MODEL_DEFAULTS["resize"]
        if checkpoint_config is not None:
            try:
                from_checkpoint = checkpoint_model_flags(args, checkpoint_config)
            except ValueError as error:
                parser.error(str(error))
        from_checkpoint["resize"] = built_size
    args.preset = "toy_world" if args.dataset_name in PRESETS else "reference"
    for name, value in {**MODEL_DEFAULTS, **REFERENCE_PRESET, **PRESETS.get(args.dataset_name, {})}.items():
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, from_checkpoint.get(name, value))
    args.resize = tuple(args.resize)
    try:
        patch_grid(args.resize)  # an input size that is no multiple of 16 fails first, with its own message
        args.model_config = model_config_from_args(args, built_size or args.resize)
        _check_region_count(args.resize, args.model_config, reranks)
    except ValueError as error:
        parser.error(str(error))
    if hasattr(args, "recall_values"):
        args.recall_values = sorted(set(args.recall_values))


def _check_region_count(resize: tuple[int, int], model_config: ModelConfig, reranks: bool) -> None:
    """Raises ValueError when the input size gives another region count than the model was built for (only a
    reranking script cares: global descriptors take any size)."""
    input_grid = patch_grid(resize)
    if reranks and num_regions(input_grid) != num_regions(model_config.grid):
        raise ValueError(
            f"--resize {resize[0]} {resize[1]} gives a {input_grid[0]}x{input_grid[1]} grid with "
            f"{num_regions(input_grid)} region nodes, but the model was built for "
            f"{model_config.image_size[0]}x{model_config.image_size[1]} "
            f"({num_regions(model_config.grid)} regions): its reranker cannot take it. Use the model's "
            f"size, or one with the same region count (e.g. its portrait)"
        )


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing and image decoding

REFERENCE_LAYOUTS = ("reference_full", "reference_global")


def choose_preprocessing(preprocessing: str, checkpoint_layout: str | None, evaluates_checkpoints: bool) -> str:
    """--preprocessing auto -> 'reference' when the script evaluates (or mines with) one of the reference's
    checkpoints (``checkpoint_layout`` in REFERENCE_LAYOUTS), so that it computes the reference's test-time function;
    'pil' otherwise (training writes this project's checkpoints, which are trained and validated with 'pil'). Any
    other value is returned as given."""
    if preprocessing != "auto":
        return preprocessing
    return "reference" if evaluates_checkpoints and checkpoint_layout in REFERENCE_LAYOUTS else "pil"


def choose_decoder(preprocessing: str, image_decoder: str) -> str:
    """The image decoder for a chosen --preprocessing ('pil' or 'reference') and --image_decoder (possibly 'auto',
    returned as given). The reference's preprocessing resizes normalised pixels, which only the PIL workers compute:
    it takes 'pil', and an explicit 'torchvision' with it raises ValueError."""
    if preprocessing != "reference":
        return image_decoder
    if image_decoder == "torchvision":
        raise ValueError(
            "--preprocessing reference resizes normalised pixels, which only the PIL workers compute: use "
            "--image_decoder pil (or auto)"
        )
    return "pil"


def resolve_preprocessing(args: argparse.Namespace, evaluates_checkpoints: bool) -> None:
    """Replaces --preprocessing auto by choose_preprocessing's answer for --resume's checkpoint."""
    if args.preprocessing != "auto":
        return
    layout = open_checkpoint(args.resume).layout if args.resume else None
    args.preprocessing = choose_preprocessing(args.preprocessing, layout, evaluates_checkpoints)
    if args.preprocessing == "reference":
        logger.info("--preprocessing auto: the reference's test-time preprocessing, for its checkpoint %s", args.resume)


def _check_decoder(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    try:
        choose_decoder(args.preprocessing, args.image_decoder)
    except ValueError as error:
        parser.error(str(error))


# ----------------------------------------------------------------------------------------------------------------
# Each script's flags, completed and checked after parsing


def complete_test_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """test.py's parsed flags -> the same namespace with presets, the checkpoint's model flags, the preprocessing
    filled in and args.model_config set; contradictory flags stop ``parser``."""
    if (args.database_folder is None) != (args.queries_folder is None):
        parser.error("--database_folder and --queries_folder go together: give both or neither")
    if args.database_folder is not None:
        if args.dataset_name not in (parser.get_default("dataset_name"), FOLDERS_NAME):
            parser.error(f"--database_folder/--queries_folder replace --dataset_name (got {args.dataset_name})")
        args.dataset_name = FOLDERS_NAME
    _check_datasets(args, parser)
    apply_presets(args, parser)
    resolve_preprocessing(args, evaluates_checkpoints=True)
    _check_decoder(args, parser)
    _check_shortlist_flags(args, parser)
    return args


def complete_train_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """train_reranking.py's parsed flags, completed as complete_test_args does, and the training flags checked."""
    apply_presets(args, parser)
    if args.queries_per_epoch % args.cache_refresh_rate:
        parser.error(
            f"--queries_per_epoch {args.queries_per_epoch} must be a multiple of --cache_refresh_rate "
            f"{args.cache_refresh_rate}"
        )
    if args.cache_frozen_backbone and args.train_stage != "reranker":
        parser.error("--cache_frozen_backbone needs --train_stage reranker (the only stage with a frozen backbone)")
    if args.mining == "global" and not args.hard_negatives:
        parser.error("--mining global needs --hard_negatives FILE (made by pre_compute_mining.py)")
    if args.mining == "global" and args.neg_hardness < args.negs_num_per_query:
        parser.error(f"--neg_hardness {args.neg_hardness} must be >= --negs_num_per_query {args.negs_num_per_query}")
    if args.global_model != OWN_MODEL and args.train_stage != "reranker":
        parser.error(
            f"--global_model {args.global_model} makes the shortlist in front of a trained reranker: it goes with "
            f"--train_stage reranker, not {args.train_stage} (which trains PRGS's own global descriptor)"
        )
    resolve_preprocessing(args, evaluates_checkpoints=False)
    _check_decoder(args, parser)
    _check_shortlist_flags(args, parser)
    return args


def complete_mining_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """pre_compute_mining.py's parsed flags, completed (global descriptors only: any input size) with the default
    output file."""
    apply_presets(args, parser, reranks=False)
    resolve_preprocessing(args, evaluates_checkpoints=True)
    _check_shortlist_flags(args, parser)
    args.output = args.output or f"result/{args.dataset_name}_hard_negatives.npz"
    return args


# ----------------------------------------------------------------------------------------------------------------
# Where the shortlist comes from, and the datasets of one evaluation


@dataclass(frozen=True)
class ShortlistSettings:
    """Where the shortlist to rerank comes from (docs/retrievers.md): PRGS's own global descriptors (both None),
    another global model's (``global_model``, from --global_model, --global_model_kwargs, --global_weights), or a
    file of ranked candidates made by another tool (``candidates``, --candidates)."""

    global_model: GlobalModelSpec | None = None
    candidates: Path | None = None


def shortlist_settings(args) -> ShortlistSettings:
    """ShortlistSettings from the flags (an entry point without --candidates or --global_model gets None there)."""
    spec = None
    if getattr(args, "global_model", OWN_MODEL) != OWN_MODEL:
        spec = global_model_spec(args.global_model, args.global_model_kwargs or "", args.global_weights)
    candidates = getattr(args, "candidates", None)
    return ShortlistSettings(spec, None if candidates is None else Path(candidates))


def _check_shortlist_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--global_model named correctly, its weights file there; --candidates alone in front of the reranker, on one
    split, without what needs global distances (--rerank_fusion) or descriptors (--faiss_index)."""
    try:
        settings = shortlist_settings(args)
    except GlobalModelError as error:
        parser.error(str(error))
    if args.global_weights is not None and settings.global_model is None:
        parser.error(f"--global_weights {args.global_weights} needs a --global_model other than {OWN_MODEL}")
    if args.global_weights is not None and not Path(args.global_weights).expanduser().is_file():
        parser.error(f"--global_weights {args.global_weights}: file not found")
    if settings.candidates is None:
        return
    clashes = {
        "--global_model": settings.global_model is not None,
        "--rerank_fusion (the file has no global distances)": args.rerank_fusion > 0,
        "--faiss_index (no descriptors are searched)": args.faiss_index is not None,
        "--datasets (the file lists the shortlists of one split)": getattr(args, "datasets", None) is not None,
    }
    for flag, given in clashes.items():
        if given:
            parser.error(f"--candidates {settings.candidates} makes the shortlist: it cannot go with {flag}")
    if not settings.candidates.is_file():
        parser.error(f"--candidates {settings.candidates}: file not found")


@dataclass(frozen=True)
class DatasetSplit:
    """One item of --datasets: a dataset's name (as --dataset_name) and a split."""

    dataset_name: str
    split: str


SPLITS = ("train", "val", "test")


def parse_datasets(text: str) -> list[DatasetSplit]:
    """--datasets ``toy_world:val,pitts30k:test,msls:val`` -> the DatasetSplits, in order; ValueError naming the item
    for one without a split, with an unknown split, or given twice."""
    items = []
    for item in (part.strip() for part in text.split(",")):
        name, colon, split = item.rpartition(":")
        if not colon or not name or split not in SPLITS:
            raise ValueError(f"--datasets: expected NAME:SPLIT with SPLIT one of {', '.join(SPLITS)}, got {item!r}")
        if DatasetSplit(name, split) in items:
            raise ValueError(f"--datasets: {item} is given twice")
        items.append(DatasetSplit(name, split))
    return items


def _check_datasets(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--datasets parsed (args.dataset_splits) and its first dataset taken as --dataset_name, whose preset fills the
    unset model flags: one configuration for every dataset of the table."""
    if args.datasets is None:
        return
    if args.database_folder is not None:
        parser.error("--datasets evaluates dataset splits; it cannot go with --database_folder/--queries_folder")
    try:
        first = parse_datasets(args.datasets)[0]
    except ValueError as error:
        parser.error(str(error))
    args.dataset_name, args.split = first.dataset_name, first.split


# ----------------------------------------------------------------------------------------------------------------
# Resuming a training run

# Argument groups (titles in parser.py) whose flags say where a run reads and writes, how it runs, what it pictures
# or tests afterwards, never what training computes: a resumed training run may give them other values and still
# continue exactly.
RESUME_FREE_GROUPS = (
    "data location",
    "starting weights",
    "runtime",
    "outputs",
    "speed (same results)",
    "pictures",
    "final test",
    "checkpointing",
)


def resume_free_flags(parser: argparse.ArgumentParser) -> frozenset[str]:
    """The flags (by dest) a resumed training run may change: those of the RESUME_FREE_GROUPS of ``parser``, and
    the model flags a checkpoint fixes (a resume takes them from the checkpoint: they cannot differ)."""
    grouped = {
        action.dest
        for group in parser._action_groups
        if group.title in RESUME_FREE_GROUPS
        for action in group._group_actions
    }
    return frozenset(grouped | set(CHECKPOINT_FLAGS))


def resumes_into_output_folder(args: argparse.Namespace) -> bool:
    """True when train_reranking.py resumes, exactly, a last.pth that lies in --output_folder: the run continues in
    its own folder, which therefore may hold its earlier outputs."""
    if not args.resume or not args.output_folder:
        return False
    if Path(args.resume).resolve().parent != Path(args.output_folder).resolve():
        return False
    state = open_checkpoint(args.resume).state
    return "training_state" in state and (state.get("args") or {}).get("train_stage") == args.train_stage


# ----------------------------------------------------------------------------------------------------------------
# Settings of the data and the model, by keyword


def model_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of model.checkpoint.build_model (besides args.model_config) that the flags set."""
    return dict(resume=args.resume, backbone_weights=args.backbone_weights, strict=not args.non_strict_resume)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation settings

# What "auto" picks per device type (docs/reranker_speed.md). One-line switches, flipped only on GPU measurements.
AUTO_RERANK_KERNEL = {"cpu": "stage0", "cuda": "plain"}
# What "auto" picks where --precision auto runs the reranking in bfloat16: on the CPU the bfloat16 distance products
# of stage0_bf16 (float32 linear layers, no autocast), on CUDA bfloat16 autocast of the plain kernel
AUTO_BF16_RERANK_KERNEL = {"cpu": "stage0_bf16", "cuda": "plain"}
AUTO_IMAGE_DECODER = {"cpu": "pil", "cuda": "pil"}


@dataclass
class EvalSettings:
    """How one split is evaluated: extraction, store, search and reranking. eval_settings builds it from the flags
    of the same names (parser.py, where each is explained); the defaults here serve code that builds it without a
    parser (tests, benchmarks)."""

    image_size: tuple[int, int]  # (H, W), from --resize
    device: torch.device
    precision: str = "fp32"  # the network's forward at extraction: "bf16" runs it under bfloat16 autocast
    reranking_precision: str = "fp32"  # the reranker's autocast (the fused kernels fix their own precision)
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
    precision_choice: StagePrecisions | None = None  # what --precision asked and resolved to (None: set in code)

    def resolved(self) -> dict:
        """What ran, where the flags said "auto" (results.json's "resolved", docs/outputs.md): the reranker kernel,
        the precision of each stage and why, the preprocessing, the image decoder, and whether this CPU multiplies
        bfloat16 natively."""
        choice = self.precision_choice or StagePrecisions(
            self.precision, self.precision, self.reranking_precision, "set by the caller"
        )
        return {
            "rerank_kernel": self.rerank_kernel,
            "precision": choice.to_dict(),
            "preprocessing": self.preprocessing,
            "image_decoder": self.image_decoder,
            "cpu_native_bf16": cpu_has_native_bf16(),
        }


# EvalSettings fields that do not come from the flag of the same name
_DERIVED_EVAL_FIELDS = (
    "image_size",
    "device",
    "precision",
    "reranking_precision",
    "rerank_kernel",
    "image_decoder",
    "precision_choice",
)


def eval_settings(args, device: torch.device) -> EvalSettings:
    """EvalSettings from the evaluation flags (shared with train_reranking.py's validation), field by field; "auto"
    resolved for the device. A fused kernel on the CPU is refused here, before any work."""
    choice = resolve_stage_precisions(args.precision, device)
    bf16_by_auto = args.precision == "auto" and choice.reranking == "bf16"
    kernel = rerank_kernel(
        resolve_auto(args.rerank_kernel, AUTO_BF16_RERANK_KERNEL if bf16_by_auto else AUTO_RERANK_KERNEL, device)
    )
    if kernel.fused and device.type != "cuda":
        raise util.PRGSError(
            f"--rerank_kernel {kernel.name} runs on CUDA only (device {device}); use stage0 (or plain) on the CPU"
        )
    if args.rerank_cuda_graphs and device.type != "cuda":
        logger.warning("--rerank_cuda_graphs has no effect on device %s (CUDA only)", device)
    image_decoder = choose_decoder(args.preprocessing, args.image_decoder)
    flags = {f.name: getattr(args, f.name) for f in fields(EvalSettings) if f.name not in _DERIVED_EVAL_FIELDS}
    return EvalSettings(
        image_size=tuple(args.resize),
        device=device,
        precision=choice.extraction,
        # under auto, stage0_bf16 is how the reranking runs bfloat16: its own products, no autocast
        reranking_precision="fp32" if bf16_by_auto and kernel.attention == "bf16_matmul" else choice.reranking,
        rerank_kernel=kernel.name,
        precision_choice=choice,
        image_decoder=resolve_auto(image_decoder, AUTO_IMAGE_DECODER, device),
        **flags,
    )


def forward_precision(args, device: torch.device) -> str:
    """--precision resolved for the network's forward outside an evaluation (mining's descriptors): "fp32" or
    "bf16", as the extraction stage resolves it (model.precision.resolve_precision)."""
    return resolve_precision(args.precision, device, "extraction")


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
    report: str = "auto"  # report.html: always, never, or auto (when pictures are saved)

    @property
    def writes_report(self) -> bool:
        """Whether report.html is written: --report always, or auto and the run saves pictures."""
        pictures = self.num_preds_to_save > 0 or self.rerank_pictures > 0
        return self.report == "always" or (self.report == "auto" and pictures)


def output_options(args) -> OutputOptions:
    """OutputOptions from the flags of the same names, field by field (a flag the entry point lacks keeps the
    default)."""
    return OutputOptions(**{f.name: getattr(args, f.name) for f in fields(OutputOptions) if hasattr(args, f.name)})
