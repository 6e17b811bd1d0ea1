"""One argparse parser for every entry point (test.py, train_reranking.py, pre_compute_mining.py).

Each entry point gets only the flags it uses. Model flags left unset are filled, in this order, from the checkpoint
given with --resume (this project's checkpoints carry their configuration), then from the dataset's preset: the
built-in toy world uses a small DeiT at a low resolution so it runs on a CPU; every other dataset uses the
reference's settings (DeiT-S distilled, 480x640, 1000 of 1200 nodes kept, top-100 reranking).
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from config import AUTO_IMAGE_DECODER, AUTO_RERANK_KERNEL
from feature_store import DEVICE_MEMORY_SHARE, FEATURE_DTYPES, HOST_MEMORY_SHARE, TIERS
from model.backbone import BACKBONES, patch_grid
from model.checkpoint import CheckpointError, open_checkpoint
from model.network import INPUT_NORMS, LOCAL_HEAD_INITS, ModelConfig
from model.reranker import RERANK_KERNELS, num_regions
from places.folders import FOLDERS_NAME
from places.images import IMAGE_DECODERS

logger = logging.getLogger(__name__)

# The model flags' defaults are ModelConfig's (the reference's settings); a preset changes some of them per dataset.
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
PRESETS = {"toy_world": TOY_WORLD_PRESET}
_DEFAULT_CONFIG = ModelConfig()
MODEL_DEFAULTS = dict(
    backbone=_DEFAULT_CONFIG.backbone,
    resize=_DEFAULT_CONFIG.image_size,
    fc_output_dim=_DEFAULT_CONFIG.fc_output_dim,
    local_dim=_DEFAULT_CONFIG.local_dim,
    num_kept_nodes=None,
    temperature=_DEFAULT_CONFIG.temperature,
    input_norm=_DEFAULT_CONFIG.input_norm,
    local_head_init=_DEFAULT_CONFIG.local_head_init,
)  # None: 5/6 of the grid


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default after its help, except for flags whose default is filled in later (None): their
    help says where the value comes from."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS, False) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--datasets_folder",
        default="data",
        help="folder holding the datasets: <datasets_folder>/<dataset_name>/images/{train,val,test}/"
        "{database,queries} for VG-format datasets, <datasets_folder>/msls for MSLS. The toy "
        "world is generated here on first use",
    )
    group.add_argument(
        "--dataset_name",
        default="toy_world",
        help="'toy_world' (built in, generated on first use), 'msls' (native Mapillary SLS), or "
        "the folder name of a VG-format dataset such as 'pitts30k'",
    )
    group.add_argument(
        "--skip_bad_images",
        action="store_true",
        help="decode every image first and leave unreadable ones out (listed in the log and "
        "results.json) instead of stopping at the first one",
    )
    group.add_argument(
        "--val_positive_dist_threshold",
        type=_positive_float,
        default=25.0,
        help="metres: database images this close to a query are correct answers (and are never "
        "used as training negatives)",
    )
    group.add_argument(
        "--preprocessing",
        choices=("auto", "pil", "reference"),
        default="auto",
        help="how an image becomes the network's input at test time. 'pil': PIL bilinear (antialiased) resize of "
        "the 8-bit image, then ImageNet normalisation (what training uses, here and in the reference); "
        "'reference': normalisation, then a bilinear resize of the float tensor without antialiasing, the "
        "reference's test-time function bit for bit. 'auto': 'reference' when test.py or "
        "pre_compute_mining.py run one of the reference's checkpoints, 'pil' otherwise (training tuples always "
        "use 'pil')",
    )
    group.add_argument(
        "--msls_cache_dir",
        default=None,
        help="where the MSLS index cache is kept (default <datasets_folder>/msls/prgs_index)",
    )


def _add_initialisation_args(group: argparse._ArgumentGroup) -> None:
    """--input_norm and --local_head_init: where the toy preset departs from the reference (docs/toy_world.md)."""
    group.add_argument(
        "--input_norm",
        choices=INPUT_NORMS,
        default=None,
        help="'imagenet': ImageNet mean/std only (the reference); 'per_image': also standardise each image's "
        "channels, which removes exposure changes and colour casts. Preset: imagenet; per_image for the toy world",
    )
    group.add_argument(
        "--local_head_init",
        choices=LOCAL_HEAD_INITS,
        default=None,
        help="initialisation of a fresh local_head (ignored when --resume loads one): 'reference' N(0, 0.01), "
        "'xavier' uniform like the reranker's layers, which starts the graph attention sharp on backbones with "
        "small tokens (docs/toy_world.md). Preset: reference; xavier for the toy world",
    )


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (unset flags come from --resume's checkpoint, else the dataset preset)")
    group.add_argument(
        "--backbone",
        choices=BACKBONES,
        default=None,
        help="global/local feature extractor: DeiT-distilled (timm) or a torchvision ResNet. "
        "Preset: deit_small; deit_micro (4 blocks, 128-d) for the toy world",
    )
    group.add_argument(
        "--resize",
        type=_positive_int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="image size fed to the network, divisible by 16. Preset: 480 640; 144 192 for the toy world",
    )
    group.add_argument("--fc_output_dim", type=_positive_int, default=None, help="global descriptor size (256)")
    group.add_argument(
        "--local_dim",
        type=_positive_int,
        default=None,
        help="local descriptor size; nodes have 3 + local_dim channels (128; 32 for the toy world)",
    )
    group.add_argument(
        "--num_kept_nodes",
        type=_positive_int,
        default=None,
        help="patch nodes kept per image, the rest (least attended) are zeroed (5/6 of the grid: "
        "1000 of 1200 at 480x640)",
    )
    group.add_argument("--temperature", type=_positive_float, default=None, help="graph softmax temperature (0.5)")
    _add_initialisation_args(group)
    group.add_argument(
        "--resume",
        default=None,
        help="checkpoint to load: this project's (rebuilds its own model), the reference's full PRGS "
        "checkpoint, or its global-only DeiT checkpoint (backbone only)",
    )
    group.add_argument(
        "--non_strict_resume",
        action="store_true",
        help="load the keys of --resume that fit and log the rest, instead of refusing a checkpoint "
        "with missing, unexpected or mis-shaped keys",
    )
    group.add_argument(
        "--backbone_weights",
        default="auto",
        help="ImageNet initialisation when not resuming: a local .pth/.safetensors file of timm's "
        "(DeiT) or torchvision's (ResNet) weights; 'auto' looks in timm's/torchvision's local "
        "cache and falls back to random weights with a warning; 'none' starts from random "
        "weights. Nothing is downloaded",
    )


def add_runtime_args(parser: argparse.ArgumentParser, save_dir: str) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the network runs; auto picks cuda when available",
    )
    group.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16 runs the network under bfloat16 autocast (fast on recent GPUs; node ranking and "
        "scores stay float32)",
    )
    group.add_argument(
        "--infer_batch_size",
        type=_positive_int,
        default=None,
        help="images per batch for feature extraction (preset 32)",
    )
    group.add_argument("--num_workers", type=_non_negative_int, default=2, help="DataLoader worker processes")
    group.add_argument("--save_dir", default=save_dir, help="outputs go to logs/<save_dir>/<YYYY-mm-dd_HH-MM-SS>/")
    group.add_argument(
        "--output_folder",
        default=None,
        help="write the outputs to this exact folder instead of logs/<save_dir>/<timestamp>/ "
        "(handy in scripts that chain runs)",
    )
    group.add_argument("--seed", type=int, default=42, help="seed for python, numpy and torch")
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the outputs an earlier run left in --output_folder (and an existing --output file of "
        "pre_compute_mining.py); without it such a run is refused. Resuming a training run from the last.pth "
        "in its own folder needs no --overwrite",
    )
    group.add_argument(
        "--dist_timeout",
        type=_positive_float,
        default=30.0,
        help="launched by torchrun with several processes: minutes a process waits for the others at a "
        "synchronisation point before the run stops with an error (docs/distributed.md)",
    )


def _auto_text(auto: dict[str, str]) -> str:
    """{"cpu": "a", "cuda": "b"} -> "a on the CPU, b on CUDA" (or "a" when both agree)."""
    if len(set(auto.values())) == 1:
        return next(iter(auto.values()))
    return f"{auto['cpu']} on the CPU, {auto['cuda']} on CUDA"


def add_speed_args(group) -> None:
    """How evaluation computes (the same function, faster): reranker kernel, CUDA graphs, store, image decoding."""
    group.add_argument(
        "--rerank_kernel",
        choices=("auto", *RERANK_KERNELS),
        default="auto",
        help="how the reranker computes (docs/reranker_speed.md): 'plain' reproduces the reference; 'stage0' runs "
        "each image's stage-0 self graph once, at extraction, instead of once per (query, candidate) pair (same "
        "function); 'fused_tf32' / 'fused_bf16' add a fused Triton distance attention on TF32 / bf16 tensor cores "
        f"(CUDA; other rounding). auto: {_auto_text(AUTO_RERANK_KERNEL)}. The fused kernels ignore --precision",
    )
    group.add_argument(
        "--rerank_cuda_graphs",
        action="store_true",
        help="replay the reranker as a CUDA graph per batch shape (CUDA only; saves the launch overhead of its "
        "many small operations)",
    )
    group.add_argument(
        "--store_tier",
        choices=("auto", *TIERS),
        default="auto",
        help="where the local features are held during evaluation (docs/feature_store.md): 'device' (GPU memory), "
        "'host' (RAM, pinned on CUDA machines), 'disk'; auto: the device when the store takes at most "
        f"{DEVICE_MEMORY_SHARE * 100:.0f}%% of the free GPU memory, else RAM when it takes at most "
        f"{HOST_MEMORY_SHARE * 100:.0f}%% of the available RAM, else disk",
    )
    group.add_argument(
        "--store_dtype",
        choices=tuple(FEATURE_DTYPES),
        default="float16",
        help="precision of the stored local features: float16 halves the store; float32 keeps the reranker's "
        "input exact (float16 rounding can swap near-tied candidates)",
    )
    group.add_argument(
        "--image_decoder",
        choices=("auto", *IMAGE_DECODERS),
        default="auto",
        help="'pil': DataLoader workers decode and resize; 'torchvision': workers read the files and the device "
        "decodes each batch (nvJPEG on CUDA; JPEGs only, others fall back to PIL). "
        f"auto: {_auto_text(AUTO_IMAGE_DECODER)}",
    )


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evaluation")
    group.add_argument(
        "--rerank_top",
        type=_positive_int,
        default=None,
        help="candidates from global retrieval that the reranker re-sorts (preset 100; 20 for the toy "
        "world); clamped to the database size with a warning",
    )
    group.add_argument(
        "--rerank_batch_size",
        type=_positive_int,
        default=None,
        help="queries per reranker call (preset 2; memory grows with it)",
    )
    add_speed_args(group)
    group.add_argument(
        "--rerank_fusion",
        type=_fraction,
        default=0.0,
        help="final score = (1 - w) * P(same place) + w * (1 + cosine similarity) / 2 of the global "
        "descriptors; 0 (default) ranks by the reranker alone, as the reference",
    )
    group.add_argument(
        "--recall_values",
        type=_positive_int,
        nargs="+",
        default=[1, 5, 10, 20, 100],
        help="N of the recall@N values to report",
    )
    add_faiss_args(group)
    group.add_argument(
        "--num_preds_to_save",
        type=_non_negative_int,
        default=0,
        help="if > 0, save a PNG per query with the query beside its top N global and reranked "
        "predictions (correct ones framed green, wrong ones red, all light grey without ground truth)",
    )
    group.add_argument(
        "--save_only_wrong_preds",
        action="store_true",
        help="pictures only for the queries whose reranked top-1 is wrong",
    )
    group.add_argument(
        "--num_queries_to_save",
        type=_non_negative_int,
        default=0,
        help="pictures (--num_preds_to_save, and test.py's --rerank_pictures) for this many queries, spread "
        "evenly over the split; 0: every query",
    )


def add_faiss_args(group) -> None:
    """Global retrieval beyond exact search (docs/distributed.md)."""
    group.add_argument(
        "--faiss_index",
        default=None,
        help="global retrieval with this faiss index-factory string instead of exact search, for databases of "
        "millions of images, e.g. IVF4096,PQ32: trained on --faiss_train_size database descriptors, its "
        "candidates are reranked, and results.json reports exact search's recall@N beside it "
        "(default: exact search)",
    )
    group.add_argument(
        "--faiss_nprobe", type=_positive_int, default=32, help="inverted lists searched per query (IVF indexes)"
    )
    group.add_argument(
        "--faiss_train_size",
        type=_positive_int,
        default=100_000,
        help="database descriptors, drawn at random, that train --faiss_index",
    )


def add_folders_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "your own photos (docs/own_photos.md): two plain folders instead of --datasets_folder/--dataset_name"
    )
    group.add_argument(
        "--database_folder",
        default=None,
        help="folder of database photos (searched recursively; jpg, png, bmp, tif, webp). Ground truth comes from "
        "VG-format file names or EXIF GPS when every photo has one, else there are no recalls",
    )
    group.add_argument("--queries_folder", default=None, help="folder of query photos (needs --database_folder)")


def add_rerank_picture_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pictures of the reranking")
    group.add_argument(
        "--rerank_pictures",
        type=_non_negative_int,
        default=0,
        help="if > 0, save a PNG per pictured query (see --num_queries_to_save) showing its reranked top N beside "
        "the query: the region pairs the stage-1 cross graph matched, regions shaded by attention, and each "
        "candidate's global and reranked rank (docs/outputs.md)",
    )


def test_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="test.py",
        formatter_class=HelpFormatter,
        description="Evaluate PRGS: extract global and local features, retrieve the top candidates with faiss, "
        "rerank them with the patch-to-region graph reranker, report recall@N.",
        epilog="Examples:\n  python test.py                          # the built-in toy world\n"
        "  python test.py --dataset_name pitts30k --datasets_folder /data --resume ckpt.pth\n"
        "  python test.py --dataset_name msls --split val --datasets_folder /data --resume msls_prgs.pt\n"
        "  python test.py --database_folder photos/db --queries_folder photos/q --resume ckpt.pth --rerank_pictures 3",
    )
    add_data_args(parser)
    parser.add_argument(
        "--split",
        choices=("train", "val", "test"),
        default="test",
        help="split to evaluate (MSLS: 'val' gives recalls, 'test' writes the challenge submission)",
    )
    add_folders_args(parser)
    add_model_args(parser)
    add_runtime_args(parser, save_dir="test")
    add_eval_args(parser)
    add_rerank_picture_args(parser)
    return parser


def add_train_split_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--train_positives_dist_threshold",
        type=_positive_float,
        default=10.0,
        help="metres: database images this close to a training query are its positives; queries "
        "without one are left out of training",
    )


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_reranking.py",
        formatter_class=HelpFormatter,
        description="Train PRGS. Stage 'reranker' (the reference's default) freezes the backbone and trains "
        "local_head + reranker with cross-entropy on positive-vs-negative logits; 'full' also trains the "
        "backbone with a triplet loss on the global descriptors; 'global' trains the global descriptor "
        "alone (triplet loss). Validates on the val split every epoch, keeps last.pth and best.pth, "
        "stops early, then tests the best model on the test split.",
        epilog="See train_reranking.sh for the reference's MSLS recipe and the toy-world demo.",
    )
    add_data_args(parser)
    add_train_split_args(parser)
    parser.add_argument(
        "--test_split",
        choices=("val", "test"),
        default="test",
        help="split for the final test of the best model; its outputs (as test.py's) go to "
        "<output>/test/ (MSLS test has no ground truth: the challenge files, no recalls)",
    )
    parser.add_argument(
        "--test_before_training",
        action="store_true",
        help="also test the model before training, to report recalls before and after",
    )
    add_model_args(parser)
    add_runtime_args(parser, save_dir="train")
    add_eval_args(parser)
    add_training_args(parser)
    add_mining_args(parser)
    add_optimiser_args(parser)
    return parser


def add_training_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument(
        "--train_stage",
        choices=("reranker", "full", "global"),
        default="reranker",
        help="what is trained (see the description above)",
    )
    group.add_argument("--epochs_num", type=_positive_int, default=50, help="maximum number of epochs")
    group.add_argument(
        "--patience", type=_positive_int, default=3, help="stop after this many epochs without a better validation R@1"
    )
    group.add_argument("--train_batch_size", type=_positive_int, default=8, help="tuples per optimiser step")
    group.add_argument(
        "--cache_frozen_backbone",
        action="store_true",
        help="stage reranker only: compute every training image's (frozen) backbone outputs once and "
        "keep them in RAM (L x C x 4 bytes per image), so each step runs only local_head and the "
        "reranker. For small datasets such as the toy world",
    )
    group.add_argument(
        "--checkpoint_every_steps",
        type=_non_negative_int,
        default=0,
        help="also write last.pth every this many optimiser steps (0: at the end of each epoch "
        "only); a resumed run continues exactly where the checkpoint was written",
    )
    group.add_argument(
        "--max_steps",
        type=_non_negative_int,
        default=0,
        help="stop after this many optimiser steps in all (0: no limit), writing last.pth so that "
        "--resume continues exactly",
    )


def add_mining_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mining")
    group.add_argument(
        "--mining",
        choices=("global", "partial", "full", "random"),
        default="partial",
        help="negatives: 'global' samples from --hard_negatives (pre_compute_mining.py); 'partial' "
        "takes the hardest of --neg_samples_num random database images; 'full' also keeps each "
        "query's previous negatives; 'random' samples at random. Never a soft positive",
    )
    group.add_argument(
        "--hard_negatives",
        default=None,
        help="hard-negative file written by pre_compute_mining.py (needed by --mining global)",
    )
    group.add_argument(
        "--neg_hardness",
        type=_positive_int,
        default=100,
        help="--mining global samples negatives from this many of each query's hardest negatives",
    )
    group.add_argument(
        "--negs_num_per_query",
        type=_positive_int,
        default=10,
        help="negatives per training query (a tuple has 2 + this many images)",
    )
    group.add_argument(
        "--neg_samples_num",
        type=_positive_int,
        default=1000,
        help="random database images each mining round considers (partial/full mining)",
    )
    group.add_argument("--queries_per_epoch", type=_positive_int, default=5000, help="training queries per epoch")
    group.add_argument(
        "--cache_refresh_rate",
        type=_positive_int,
        default=1000,
        help="queries per mining round; negatives are mined again every this many queries "
        "(descriptors of a frozen global model are computed once and reused)",
    )


def add_optimiser_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimiser")
    group.add_argument("--lr", type=_positive_float, default=1e-5, help="AdamW learning rate")
    group.add_argument("--weight_decay", type=float, default=0.03, help="AdamW weight decay")
    group.add_argument(
        "--lr_schedule",
        choices=("step", "cosine"),
        default="step",
        help="per epoch after warm-up: 'step' multiplies the lr by --lr_step_gamma every "
        "--lr_step_epochs epochs (the reference: x0.1 every 4); 'cosine' decays it to 0 at "
        "--epochs_num",
    )
    group.add_argument("--lr_step_epochs", type=_positive_int, default=4, help="epochs between lr steps")
    group.add_argument("--lr_step_gamma", type=_positive_float, default=0.1, help="lr factor at each step")
    group.add_argument(
        "--warmup_epochs", type=_non_negative_int, default=0, help="epochs of linear warm-up from 0.1 x lr"
    )
    group.add_argument(
        "--margin",
        type=_positive_float,
        default=0.1,
        help="triplet-loss margin on the global descriptors (stages full and global)",
    )
    group.add_argument("--grad_clip", type=float, default=0.0, help="clip the gradient norm to this (0: off)")


def parse_train_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = train_parser()
    args = parser.parse_args(argv)
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
    resolve_preprocessing(args, evaluates_checkpoints=False)
    return args


def mining_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pre_compute_mining.py",
        formatter_class=HelpFormatter,
        description="Compute global descriptors of the training split with a model and write, for every training "
        "query, its hardest negatives (most similar database images that are not soft positives), "
        "for train_reranking.py --mining global.",
    )
    add_data_args(parser)
    add_train_split_args(parser)
    add_model_args(parser)
    add_runtime_args(parser, save_dir="mining")
    group = parser.add_argument_group("mining")
    group.add_argument(
        "--num_hard_negatives",
        type=_positive_int,
        default=200,
        help="negatives kept per query (rows are padded with -1 when fewer exist)",
    )
    group.add_argument(
        "--chunk_size", type=_positive_int, default=1024, help="queries searched at a time (bounds memory)"
    )
    group.add_argument(
        "--output", default=None, help="file to write (default result/<dataset_name>_hard_negatives.npz)"
    )
    return parser


def parse_mining_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = mining_parser()
    args = parser.parse_args(argv)
    apply_presets(args, parser, reranks=False)
    resolve_preprocessing(args, evaluates_checkpoints=True)
    args.output = args.output or f"result/{args.dataset_name}_hard_negatives.npz"
    return args


def parse_test_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = test_parser()
    args = parser.parse_args(argv)
    if (args.database_folder is None) != (args.queries_folder is None):
        parser.error("--database_folder and --queries_folder go together: give both or neither")
    if args.database_folder is not None:
        if args.dataset_name not in (parser.get_default("dataset_name"), FOLDERS_NAME):
            parser.error(f"--database_folder/--queries_folder replace --dataset_name (got {args.dataset_name})")
        args.dataset_name = FOLDERS_NAME
    apply_presets(args, parser)
    resolve_preprocessing(args, evaluates_checkpoints=True)
    if args.preprocessing == "reference" and args.image_decoder == "torchvision":
        parser.error(
            "--preprocessing reference resizes normalised pixels, which only the PIL workers compute: use "
            "--image_decoder pil (or auto)"
        )
    return args


REFERENCE_LAYOUTS = ("reference_full", "reference_global")


def resolve_preprocessing(args: argparse.Namespace, evaluates_checkpoints: bool) -> None:
    """--preprocessing auto -> 'reference' when the script evaluates (or mines with) one of the reference's
    checkpoints, so that it computes the reference's test-time function; 'pil' otherwise (training writes this
    project's checkpoints, which are trained and validated with 'pil')."""
    if args.preprocessing != "auto":
        return
    layout = open_checkpoint(args.resume).layout if args.resume else None
    args.preprocessing = "reference" if evaluates_checkpoints and layout in REFERENCE_LAYOUTS else "pil"
    if args.preprocessing == "reference":
        logger.info("--preprocessing auto: the reference's test-time preprocessing, for its checkpoint %s", args.resume)


def resumes_into_output_folder(args: argparse.Namespace) -> bool:
    """True when train_reranking.py resumes, exactly, a last.pth that lies in --output_folder: the run continues in
    its own folder, which therefore may hold its earlier outputs."""
    if not args.resume or not args.output_folder:
        return False
    if Path(args.resume).resolve().parent != Path(args.output_folder).resolve():
        return False
    state = open_checkpoint(args.resume).state
    return "training_state" in state and (state.get("args") or {}).get("train_stage") == args.train_stage


def apply_presets(args: argparse.Namespace, parser: argparse.ArgumentParser, reranks: bool = True) -> None:
    """Fill unset model/runtime flags from the checkpoint's configuration, then the dataset preset, and validate.

    Sets args.model_config: the network to build. Its image size is the checkpoint's (this project's files record
    it; the reference's files were all made at 480x640), while --resize is the input size, which may differ
    (positional embeddings are fitted) as long as the reranker gets the same region count (``reranks``).
    """
    checkpoint_config, built_size = None, None
    if getattr(args, "resume", None):
        if Path(args.resume).is_dir():
            parser.error(f"--resume {args.resume} is a folder; expected a checkpoint file, e.g. {args.resume}/last.pth")
        if not Path(args.resume).is_file():
            parser.error(f"--resume {args.resume}: file not found")
        try:
            checkpoint = open_checkpoint(args.resume)
        except CheckpointError as error:
            parser.error(f"--resume {args.resume}: {error}")
        checkpoint_config = checkpoint.model_config
        built_size = tuple(checkpoint_config.image_size) if checkpoint_config else MODEL_DEFAULTS["resize"]
    preset = dict(REFERENCE_PRESET, **PRESETS.get(args.dataset_name, {}))
    args.preset = "toy_world" if args.dataset_name in PRESETS else "reference"
    from_checkpoint = {}
    if checkpoint_config is not None:
        from_checkpoint = _checkpoint_model_flags(args, parser, checkpoint_config)
    elif built_size is not None:
        from_checkpoint = dict(resize=built_size)
    defaults = dict(MODEL_DEFAULTS, **preset)
    for name, value in defaults.items():
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, from_checkpoint.get(name, value))
    args.resize = tuple(args.resize)
    try:
        input_grid = patch_grid(args.resize)
        args.model_config = model_config_from_args(args, built_size or args.resize)
        if reranks and num_regions(input_grid) != num_regions(args.model_config.grid):
            raise ValueError(
                f"--resize {args.resize[0]} {args.resize[1]} gives a {input_grid[0]}x{input_grid[1]} grid with "
                f"{num_regions(input_grid)} region nodes, but the model was built for "
                f"{args.model_config.image_size[0]}x{args.model_config.image_size[1]} "
                f"({num_regions(args.model_config.grid)} regions): its reranker cannot take it. Use the model's "
                f"size, or one with the same region count (e.g. its portrait)"
            )
    except ValueError as error:
        parser.error(str(error))
    if hasattr(args, "recall_values"):
        args.recall_values = sorted(set(args.recall_values))


def _checkpoint_model_flags(
    args: argparse.Namespace, parser: argparse.ArgumentParser, checkpoint_config: ModelConfig
) -> dict:
    """The model flags a checkpoint's configuration fixes, by flag name; a given flag that contradicts one stops the
    parser (--resize may differ: the input size is free as long as the region count fits)."""
    from_checkpoint = dict(
        backbone=checkpoint_config.backbone,
        resize=tuple(checkpoint_config.image_size),
        fc_output_dim=checkpoint_config.fc_output_dim,
        local_dim=checkpoint_config.local_dim,
        num_kept_nodes=checkpoint_config.num_kept_nodes,
        temperature=checkpoint_config.temperature,
        input_norm=checkpoint_config.input_norm,
    )
    for name, value in from_checkpoint.items():
        given = getattr(args, name, None)
        if name != "resize" and given is not None and given != value:
            parser.error(
                f"--{name} {given} conflicts with the checkpoint {args.resume}, which was trained with "
                f"{name}={value}; leave the flag out to use the checkpoint's value"
            )
    return from_checkpoint


def model_config_from_args(args: argparse.Namespace, image_size: tuple[int, int]) -> ModelConfig:
    """The ModelConfig the flags describe, built for ``image_size``."""
    return ModelConfig(
        backbone=args.backbone,
        image_size=tuple(image_size),
        fc_output_dim=args.fc_output_dim,
        local_dim=args.local_dim,
        num_kept_nodes=args.num_kept_nodes,
        temperature=args.temperature,
        input_norm=args.input_norm,
        local_head_init=args.local_head_init,
    )


def split_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of datasets_ws.load_split that the data flags set."""
    options = dict(
        positive_dist_threshold=args.val_positive_dist_threshold,
        skip_bad_images=args.skip_bad_images,
        num_workers=args.num_workers,
        msls_cache_dir=args.msls_cache_dir,
    )
    if hasattr(args, "train_positives_dist_threshold"):
        options["train_positive_dist_threshold"] = args.train_positives_dist_threshold
    if args.dataset_name == FOLDERS_NAME:
        options.update(database_folder=args.database_folder, queries_folder=args.queries_folder, image_size=args.resize)
    return options


def model_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of model.checkpoint.build_model (besides args.model_config) that the flags set."""
    return dict(resume=args.resume, backbone_weights=args.backbone_weights, strict=not args.non_strict_resume)
