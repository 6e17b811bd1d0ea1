"""The flags of every entry point (test.py, train_reranking.py, pre_compute_mining.py), each getting those it uses,
in argument groups by what they change (config.RESUME_FREE_GROUPS: those a resumed training run may change); config
completes and checks the parsed namespace."""

from __future__ import annotations

import argparse

from config import (
    AUTO_BF16_RERANK_KERNEL,
    AUTO_IMAGE_DECODER,
    AUTO_RERANK_KERNEL,
    auto_text,
    complete_mining_args,
    complete_test_args,
    complete_train_args,
    preset_text,
)
from feature_store import DEVICE_MEMORY_SHARE, FEATURE_DTYPES, HOST_MEMORY_SHARE, TIERS
from flag_types import HelpFormatter, fraction, non_negative_int, positive_float, positive_int, seed
from model.backbone import BACKBONES
from model.network import INPUT_NORMS, LOCAL_HEAD_INITS
from model.precision import PRECISION_CHOICES
from model.reranker import RERANK_KERNELS
from places.images import IMAGE_DECODERS
from retrievers import OWN_MODEL
from retrievers import PRESETS as RETRIEVER_PRESETS
from training_flags import add_mining_args, add_optimiser_args, add_train_split_args, add_training_args


def add_data_args(parser: argparse.ArgumentParser) -> None:
    location = parser.add_argument_group("data location")
    location.add_argument(
        "--datasets_folder",
        default="data",
        help="folder holding the datasets: <datasets_folder>/<dataset_name>/images/{train,val,test}/"
        "{database,queries} for VG-format datasets, <datasets_folder>/msls for MSLS. The toy "
        "world is generated here on first use",
    )
    location.add_argument(
        "--msls_cache_dir",
        default=None,
        help="where the MSLS index cache is kept (default <datasets_folder>/msls/prgs_index)",
    )
    group = parser.add_argument_group("data")
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
        type=positive_float,
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


def _add_initialisation_args(group: argparse._ArgumentGroup) -> None:
    """--input_norm and --local_head_init: where the toy preset departs from the reference (docs/toy_world.md)."""
    group.add_argument(
        "--input_norm",
        choices=INPUT_NORMS,
        default=None,
        help="'imagenet': ImageNet mean/std only (the reference); 'per_image': also standardise each image's "
        f"channels, which removes exposure changes and colour casts. {preset_text('input_norm')}",
    )
    group.add_argument(
        "--local_head_init",
        choices=LOCAL_HEAD_INITS,
        default=None,
        help="initialisation of a fresh local_head (ignored when --resume loads one): 'reference' N(0, 0.01), "
        "'xavier' uniform like the reranker's layers, which starts the graph attention sharp on backbones with "
        f"small tokens (docs/toy_world.md). {preset_text('local_head_init')}",
    )


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (unset flags come from --resume's checkpoint, else the dataset preset)")
    group.add_argument(
        "--backbone",
        choices=BACKBONES,
        default=None,
        help="global/local feature extractor: DeiT-distilled (timm; deit_micro has 4 blocks of 128-d) or a "
        f"torchvision ResNet. {preset_text('backbone')}",
    )
    group.add_argument(
        "--resize",
        type=positive_int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help=f"image size fed to the network, divisible by 16. {preset_text('resize')}",
    )
    group.add_argument(
        "--fc_output_dim",
        type=positive_int,
        default=None,
        help=f"global descriptor size. {preset_text('fc_output_dim')}",
    )
    group.add_argument(
        "--local_dim",
        type=positive_int,
        default=None,
        help=f"local descriptor size; nodes have 3 + local_dim channels. {preset_text('local_dim')}",
    )
    group.add_argument(
        "--num_kept_nodes",
        type=positive_int,
        default=None,
        help="patch nodes kept per image, the rest (least attended) are zeroed (5/6 of the grid: "
        "1000 of 1200 at 480x640)",
    )
    group.add_argument(
        "--temperature",
        type=positive_float,
        default=None,
        help=f"graph softmax temperature. {preset_text('temperature')}",
    )
    _add_initialisation_args(group)
    _add_weights_args(parser)


def _add_weights_args(parser: argparse.ArgumentParser) -> None:
    """Where the network's weights come from: --resume, --non_strict_resume, --backbone_weights."""
    group = parser.add_argument_group("starting weights")
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
    """Three groups: how the run executes (runtime), what changes its numbers (computation), where it writes."""
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the network runs; auto picks cuda when available",
    )
    group.add_argument("--num_workers", type=non_negative_int, default=2, help="DataLoader worker processes")
    group.add_argument(
        "--dist_timeout",
        type=positive_float,
        default=30.0,
        help="launched by torchrun with several processes: minutes a process waits for the others at a "
        "synchronisation point before the run stops with an error (docs/distributed.md)",
    )
    group = parser.add_argument_group("computation")
    group.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default="auto",
        help="auto: bfloat16 only on hardware that multiplies it natively (CUDA compute capability >= 8.0, CPUs "
        "with AMX or AVX-512 BF16) AND only for the stages whose measured accuracy bound holds (none today: "
        "extraction and reranking run float32; docs/reranker_speed.md); fp32: exact, reproduces the published "
        "numbers; bf16: the network and the reranker under bfloat16 autocast everywhere (fast on recent GPUs; node "
        "ranking and scores stay float32). results.json records what ran",
    )
    group.add_argument(
        "--infer_batch_size",
        type=positive_int,
        default=None,
        help=f"images per batch for feature extraction. {preset_text('infer_batch_size')}",
    )
    group.add_argument("--seed", type=seed, default=42, help="seed for python, numpy and torch")
    group = parser.add_argument_group("outputs")
    group.add_argument("--save_dir", default=save_dir, help="outputs go to logs/<save_dir>/<YYYY-mm-dd_HH-MM-SS>/")
    group.add_argument(
        "--output_folder",
        default=None,
        help="write the outputs to this exact folder instead of logs/<save_dir>/<timestamp>/ "
        "(handy in scripts that chain runs)",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the outputs an earlier run left in --output_folder (and an existing --output file of "
        "pre_compute_mining.py); without it such a run is refused. Resuming a training run from the last.pth "
        "in its own folder needs no --overwrite",
    )


def add_speed_args(parser: argparse.ArgumentParser) -> None:
    """How evaluation computes (the same function, faster): reranker kernel, store precision and image decoding, which
    may change the rounding; CUDA graphs and the store's place, which give the same results."""
    group = parser.add_argument_group("speed (may change rounding)")
    group.add_argument(
        "--rerank_kernel",
        choices=("auto", *RERANK_KERNELS),
        default="auto",
        help="how the reranker computes (docs/reranker_speed.md): 'plain' reproduces the reference; 'stage0' runs "
        "each image's stage-0 self graph once, at extraction, instead of once per (query, candidate) pair (same "
        "function); 'fused_tf32' / 'fused_bf16' add a fused Triton distance attention on TF32 / bf16 tensor cores "
        f"(CUDA; other rounding); 'stage0_bf16': stage0 with bfloat16 distance products (CPUs with native bfloat16). "
        f"auto: {auto_text(AUTO_RERANK_KERNEL)}; where --precision auto runs the reranking in bfloat16: "
        f"{auto_text(AUTO_BF16_RERANK_KERNEL)}. The fused kernels ignore --precision",
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
        f"auto: {auto_text(AUTO_IMAGE_DECODER)}",
    )
    group = parser.add_argument_group("speed (same results)")
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


def add_eval_args(parser: argparse.ArgumentParser, rerank_pictures: bool = False) -> None:
    """The evaluation's flags; ``rerank_pictures``: also test.py's --rerank_pictures."""
    group = parser.add_argument_group("evaluation")
    group.add_argument(
        "--rerank_top",
        type=positive_int,
        default=None,
        help="candidates from global retrieval that the reranker re-sorts, clamped to the database size with a "
        f"warning. {preset_text('rerank_top')}",
    )
    group.add_argument(
        "--rerank_batch_size",
        type=positive_int,
        default=None,
        help=f"queries per reranker call; memory grows with it. {preset_text('rerank_batch_size')}",
    )
    group.add_argument(
        "--rerank_fusion",
        type=fraction,
        default=0.0,
        help="final score = (1 - w) * P(same place) + w * (1 + cosine similarity) / 2 of the global "
        "descriptors; 0 (default) ranks by the reranker alone, as the reference",
    )
    group.add_argument(
        "--recall_values",
        type=positive_int,
        nargs="+",
        default=[1, 5, 10, 20, 100],
        help="N of the recall@N values to report",
    )
    # global retrieval beyond exact search (docs/distributed.md)
    group.add_argument(
        "--faiss_index",
        default=None,
        help="global retrieval with this faiss index-factory string instead of exact search, for databases of "
        "millions of images, e.g. IVF4096,PQ32: trained on --faiss_train_size database descriptors, its "
        "candidates are reranked, and results.json reports exact search's recall@N beside it "
        "(default: exact search)",
    )
    group.add_argument(
        "--faiss_nprobe", type=positive_int, default=32, help="inverted lists searched per query (IVF indexes)"
    )
    group.add_argument(
        "--faiss_train_size",
        type=positive_int,
        default=100_000,
        help="database descriptors, drawn at random, that train --faiss_index",
    )
    add_speed_args(parser)
    _add_picture_args(parser, rerank_pictures)


def _add_picture_args(parser: argparse.ArgumentParser, rerank_pictures: bool) -> None:
    group = parser.add_argument_group("pictures")
    group.add_argument(
        "--num_preds_to_save",
        type=non_negative_int,
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
        type=non_negative_int,
        default=0,
        help="pictures (--num_preds_to_save, and test.py's --rerank_pictures) for this many queries, spread "
        "evenly over the split; 0: every query",
    )
    group.add_argument(
        "--report",
        choices=("auto", "always", "never"),
        default="auto",
        help="report.html beside results.json: one self-contained page (opens from disk in any browser) of the "
        "queries reranking fixed and broke, the recalls and a gallery of queries (docs/outputs.md). auto: when "
        "pictures are saved (--num_preds_to_save or --rerank_pictures > 0)",
    )
    if rerank_pictures:
        group.add_argument(
            "--rerank_pictures",
            type=non_negative_int,
            default=0,
            help="if > 0, save a PNG per pictured query (see --num_queries_to_save) showing its reranked top N beside "
            "the query: the region pairs the stage-1 cross graph matched, regions shaded by attention, and each "
            "candidate's global and reranked rank (docs/outputs.md)",
        )


def add_global_model_args(parser: argparse.ArgumentParser, candidates: bool = False) -> None:
    """Where the shortlist comes from (docs/retrievers.md): --global_model and its keyword arguments and weights;
    ``candidates``: also test.py's --candidates."""
    group = parser.add_argument_group("global retrieval (docs/retrievers.md)")
    group.add_argument(
        "--global_model",
        default=OWN_MODEL,
        help=f"the global model whose descriptors make the shortlist: '{OWN_MODEL}' (PRGS's own), a preset "
        f"({', '.join(RETRIEVER_PRESETS)}), PRESET@FOLDER, FOLDER:ENTRY (a local folder with a hubconf.py) or "
        "owner/repo:ENTRY. The reranker keeps PRGS's local features; only the faiss search uses this model",
    )
    group.add_argument(
        "--global_model_kwargs",
        default=None,
        help="keyword arguments of the --global_model entry, key=value,key=value (values read as Python literals "
        "when they parse, else as strings)",
    )
    group.add_argument(
        "--global_weights",
        default=None,
        help="local weights file of --global_model: answers the entry's own download of the same file name, or is "
        "loaded strictly into the model it returns. Nothing is downloaded",
    )
    if candidates:
        group.add_argument(
            "--candidates",
            default=None,
            help="rerank the ranked shortlists in this file, made by another tool (predictions.csv, a plain CSV or "
            "a pairs file; docs/retrievers.md), instead of searching global descriptors; the global row is the "
            "file's order",
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
    parser.add_argument(
        "--datasets",
        default=None,
        help="evaluate on several datasets in one run and print one table (docs/benchmarks.md): comma-separated "
        "NAME:SPLIT items, e.g. toy_world:val,pitts30k:test,msls:val (replaces --dataset_name and --split)",
    )
    add_folders_args(parser)
    add_model_args(parser)
    add_global_model_args(parser, candidates=True)
    add_runtime_args(parser, save_dir="test")
    add_eval_args(parser, rerank_pictures=True)
    return parser


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
    group = parser.add_argument_group("final test")
    group.add_argument(
        "--test_split",
        choices=("val", "test"),
        default="test",
        help="split for the final test of the best model; its outputs (as test.py's) go to "
        "<output>/test/ (MSLS test has no ground truth: the challenge files, no recalls)",
    )
    group.add_argument(
        "--test_before_training",
        action="store_true",
        help="also test the model before training, to report recalls before and after",
    )
    add_model_args(parser)
    add_global_model_args(parser)
    add_runtime_args(parser, save_dir="train")
    add_eval_args(parser)
    add_training_args(parser)
    add_mining_args(parser)
    add_optimiser_args(parser)
    return parser


def parse_train_args(argv: list[str] | None = None) -> argparse.Namespace:
    """train_reranking.py's flags, completed and checked by config.complete_train_args."""
    parser = train_parser()
    return complete_train_args(parser.parse_args(argv), parser)


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
    add_global_model_args(parser)
    add_runtime_args(parser, save_dir="mining")
    group = parser.add_argument_group("mining")
    group.add_argument(
        "--num_hard_negatives",
        type=positive_int,
        default=200,
        help="negatives kept per query (rows are padded with -1 when fewer exist)",
    )
    group.add_argument(
        "--chunk_size", type=positive_int, default=1024, help="queries searched at a time (bounds memory)"
    )
    group.add_argument(
        "--output", default=None, help="file to write (default result/<dataset_name>_hard_negatives.npz)"
    )
    return parser


def parse_mining_args(argv: list[str] | None = None) -> argparse.Namespace:
    """pre_compute_mining.py's flags, completed and checked by config.complete_mining_args."""
    parser = mining_parser()
    return complete_mining_args(parser.parse_args(argv), parser)


def parse_test_args(argv: list[str] | None = None) -> argparse.Namespace:
    """test.py's flags, completed and checked by config.complete_test_args."""
    parser = test_parser()
    return complete_test_args(parser.parse_args(argv), parser)
