"""bfloat16 on the CPU: speed and accuracy of each lever side by side, in one process, on a quiet machine.

    python benchmarks/bench_cpu_precision.py --golden_dir ../shared/reference/golden \
        --toy_checkpoint logs/toy_world_demo/latest/reranker/best.pth --datasets_folder data --out /tmp/cpu_precision
    python benchmarks/bench_cpu_precision.py --smoke --out /tmp/cpu_precision_smoke      # tiny sizes, a minute

Part 0, the bound: GFLOP/s of a 2400x384x1536 matrix product in float32 and bfloat16.
Part 1, extraction: PRGSNetwork.forward (global + local) with DeiT-S at 480x640 (random weights), s/image, for
float32 (today), bf16 autocast, bf16 weights, timm's explicit attention instead of SDPA, and 1 thread instead of
all; accuracy columns: the largest change of a global descriptor and of a local feature against float32.
Part 2, reranking: the reranker at top-K (10 and 100) x 1200 nodes (golden weights when given), s/query, for the
plain and stage0 kernels in float32 (in blocks of images, and "(before)": the whole group at once), stage0 under
bf16 autocast, the stage0_bf16 kernel (bfloat16 distance and aggregation products, model/bf16_attention.py) with
and without autocast, 2 queries per call, and stage0 / stage0_bf16 under torch.compile (TorchInductor fuses the
element-wise passes between the products; the first call compiles, its seconds are reported); peak RSS growth of
each; accuracy columns: the largest logit error against the float64 golden and whether its order holds.
Part 3 (with --toy_checkpoint): the trained toy model end to end on the toy world's splits, each precision setting
against float32 with the plain kernel (benchmarks/bench_toy_accuracy.py's comparison): top-1 agreement, R@1/5/10
change, and whether it meets the bar that --precision auto needs.

Runs alternate between the settings so that a changing load hits all alike; medians are reported with the load
average (absolute times on a loaded machine mean little, their ratios more). Output: <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch._inductor.config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_gpu import reranker_input  # noqa: E402
from bench_toy_accuracy import compare, summarise  # noqa: E402

import model.reranker as reranker_module  # noqa: E402
from config import EvalSettings  # noqa: E402
from datasets_ws import SplitRequest, load_split  # noqa: E402
from evaluation import evaluate  # noqa: E402
from model.checkpoint import build_model  # noqa: E402
from model.network import ModelConfig, PRGSNetwork  # noqa: E402
from model.precision import cpu_flags, cpu_has_native_bf16  # noqa: E402
from model.reranker import RERANK_KERNELS, GraphReranker  # noqa: E402

EXTRACTION_LEVERS = {  # name -> (autocast, bf16 weights, SDPA attention, threads: None = all)
    "fp32 (today)": (False, False, True, None),
    "bf16 autocast": (True, False, True, None),
    "bf16 weights": (False, True, True, None),
    "fp32, explicit attention": (False, False, False, None),
    "bf16 autocast, 1 thread": (True, False, True, 1),
}
RERANK_LEVERS = {  # name -> (kernel, autocast, queries per call, torch.compile)
    "plain fp32, whole group (before)": ("plain", False, 1, False),
    "stage0 fp32, whole group (before)": ("stage0", False, 1, False),
    "plain fp32": ("plain", False, 1, False),
    "stage0 fp32 (the CPU default)": ("stage0", False, 1, False),
    "stage0, bf16 autocast": ("stage0", True, 1, False),
    "stage0_bf16": ("stage0_bf16", False, 1, False),
    "stage0_bf16, bf16 autocast": ("stage0_bf16", True, 1, False),
    "stage0 fp32, 2 queries per call": ("stage0", False, 2, False),
    "stage0_bf16, 2 queries per call": ("stage0_bf16", False, 2, False),
    # the element-wise passes fused by TorchInductor (C++/OpenMP kernels; the products stay library calls)
    "stage0 fp32, torch.compile": ("stage0", False, 1, True),
    "stage0_bf16, torch.compile": ("stage0_bf16", False, 1, True),
}


@contextlib.contextmanager
def images_per_block(lever: str):
    """The "(before)" levers run the node graphs' float32 attention over the whole group at once, as before it ran
    in blocks of images (reranker_module.IMAGES_PER_BLOCK)."""
    saved = reranker_module.IMAGES_PER_BLOCK
    reranker_module.IMAGES_PER_BLOCK = 10**9 if lever.endswith("(before)") else saved
    try:
        yield
    finally:
        reranker_module.IMAGES_PER_BLOCK = saved


TOY_SETTINGS = {  # name -> EvalSettings overrides, against float32 + plain kernel + float32 store
    "stage0 fp32 (the CPU default)": dict(rerank_kernel="stage0"),
    "bf16 extraction + stage0 (bf16 autocast)": dict(
        rerank_kernel="stage0", precision="bf16", reranking_precision="bf16"
    ),
    "stage0_bf16 (fp32 extraction)": dict(rerank_kernel="stage0_bf16"),
    "bf16 extraction + stage0_bf16 (autocast)": dict(
        rerank_kernel="stage0_bf16", precision="bf16", reranking_precision="bf16"
    ),
}


class PeakRss:
    """The largest growth of this process's resident memory (MB) while the ``with`` block runs (Linux; 0 else)."""

    def __enter__(self):
        self.start = self.peak = _rss_mb()
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while self.running:
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.growth_mb = self.peak - self.start


def _rss_mb() -> float:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def timed(run, repeats: int, label: str, times: dict, peaks: dict) -> None:
    with PeakRss() as peak:
        start = time.perf_counter()
        run()
        times.setdefault(label, []).append(time.perf_counter() - start)
    peaks[label] = max(peaks.get(label, 0.0), peak.growth_mb)


def extraction_part(image_size: tuple[int, int], batch: int, repeats: int, backbone: str) -> dict:
    """s/image of every EXTRACTION_LEVERS entry (alternating), and the accuracy of each against float32."""
    config = ModelConfig(backbone=backbone, image_size=image_size)
    torch.manual_seed(0)
    float_model = PRGSNetwork(config).eval()
    bf16_model = PRGSNetwork(config).eval()
    bf16_model.load_state_dict(float_model.state_dict())
    bf16_model = bf16_model.to(torch.bfloat16)
    images = torch.randn(batch, 3, *image_size)
    threads = torch.get_num_threads()

    def forward(lever: str):
        autocast, weights, sdpa, num_threads = EXTRACTION_LEVERS[lever]
        model = bf16_model if weights else float_model
        for block in model.backbone.blocks:
            block.attn.fused_attn = sdpa
        torch.set_num_threads(num_threads or threads)
        try:
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                return model(images.to(torch.bfloat16) if weights else images)
        finally:
            torch.set_num_threads(threads)

    reference = forward("fp32 (today)")
    rows = {}
    for lever in EXTRACTION_LEVERS:
        descriptors, local = forward(lever)  # the warm-up run, and the accuracy columns
        rows[lever] = {
            "max_abs_global_diff": (descriptors.float() - reference[0]).abs().max().item(),
            "min_global_cosine": torch.nn.functional.cosine_similarity(descriptors.float(), reference[0]).min().item(),
            **local_feature_diff(local.float(), reference[1]),
        }
    times, peaks = {}, {}
    for _ in range(repeats):
        for lever in EXTRACTION_LEVERS:
            timed(lambda lever=lever: forward(lever), repeats, lever, times, peaks)
    for lever, row in rows.items():
        row["s_per_image"] = statistics.median(times[lever]) / batch
        row["peak_rss_growth_mb"] = peaks[lever]
    return rows


def matmul_rates(shape: tuple[int, int, int], repeats: int) -> dict:
    """GFLOP/s of one (m x k) @ (k x n) product in float32 and in bfloat16 (the best of ``repeats`` timed runs of 5
    products): the machine's bound for the linear layers and the attention's products."""
    m, k, n = shape
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(5):
                a @ b
            best = min(best, (time.perf_counter() - start) / 5)
        rates[str(dtype).removeprefix("torch.")] = 2 * m * k * n / best / 1e9
    return rates


def local_feature_diff(local: torch.Tensor, reference: torch.Tensor) -> dict:
    """Nodes (B, L, 3+f) against float32's: the share of nodes kept in one and zeroed in the other (the lowest
    attention is zeroed: near-ties flip under rounding), and the largest change over the nodes both keep."""
    kept, kept_reference = local.abs().sum(-1) > 0, reference.abs().sum(-1) > 0  # (B, L)
    both = kept & kept_reference
    return {
        "kept_nodes_changed_pct": 100 * (kept != kept_reference).float().mean().item(),
        "max_abs_local_diff": (local[both] - reference[both]).abs().max().item() if both.any() else 0.0,
    }


def reranker_part(golden_dir: Path | None, tops: list[int], grid: tuple[int, int], channels: int, repeats: int):
    """s/query of every RERANK_LEVERS entry at each top-K (alternating), and the golden logit errors."""
    reranker = GraphReranker(channels, grid).eval()
    if golden_dir is not None:
        reranker.load_state_dict(torch.load(golden_dir / "reranker_state_dict.pt", weights_only=True))
    run = RerankerRun(reranker)
    accuracy = golden_accuracy(run, golden_dir) if golden_dir is not None else {}
    rows = {lever: dict(accuracy.get(lever, {})) for lever in RERANK_LEVERS}
    for top in tops:
        nodes = reranker_input(2, top, grid, channels, grid[0] * grid[1] * 5 // 6)  # (2, 1+K, L, C)
        times, peaks, first_call = _time_reranker(run, nodes, repeats)
        for lever, (_, _, per_call, compiled) in RERANK_LEVERS.items():
            rows[lever][f"s_per_query_top{top}"] = statistics.median(times[lever]) / per_call
            rows[lever][f"peak_rss_growth_mb_top{top}"] = peaks[lever]
            if compiled:  # the first call compiles (TorchInductor's on-disk cache makes a later process faster)
                rows[lever][f"first_call_s_top{top}"] = first_call[lever]
    return rows


class RerankerRun:
    """Calls the reranker as a RERANK_LEVERS entry says: kernel, bf16 autocast, queries per call, the graphs' images
    per block, and eager or torch.compile (one compiled module: it recompiles per kernel and input shape)."""

    def __init__(self, reranker: GraphReranker):
        self.reranker = reranker
        # keep the float32 -> bfloat16 -> float32 round trips that stage0_bf16's split norms rely on (TorchInductor
        # drops them by default: the golden logit error of the compiled stage0_bf16 then grows from 2e-3 to 2e-2)
        torch._inductor.config.emulate_precision_casts = True
        self.compiled = torch.compile(reranker, dynamic=False)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)

    def __call__(self, lever: str, raw: torch.Tensor, stage0: dict) -> torch.Tensor:
        """raw nodes (B, 1+K, L, C) and their stage-0 outputs per attention -> logits (per_call, K, 2)."""
        name, autocast, per_call, compiled = RERANK_LEVERS[lever]
        kernel = RERANK_KERNELS[name]
        x = stage0[kernel.attention] if kernel.precomputed_stage0 else raw
        forward = self.compiled if compiled else self.reranker
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast), images_per_block(lever):
            return forward(x[:per_call], self.reranker.grid, kernel)

    def stage0(self, nodes: torch.Tensor, autocast: bool = False) -> dict:
        """nodes (B, 1+K, L, C) -> {attention: stage0_self_graph of every image, (B, 1+K, L, C)} (eager)."""
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            flat = nodes.flatten(0, 1).unsqueeze(1)  # (B*(1+K), 1, L, C): one image per group
            return {
                attention: self.reranker.stage0_self_graph(flat, self.reranker.grid, attention).reshape(nodes.shape)
                for attention in ("cdist", "bf16_matmul")
            }


def _time_reranker(run: RerankerRun, nodes: torch.Tensor, repeats: int) -> tuple[dict, dict, dict]:
    """Seconds per call (lists), peak RSS growth and the first call's seconds of every RERANK_LEVERS entry on
    nodes (2, 1+K, L, C)."""
    stage0 = run.stage0(nodes)
    times, peaks, first_call = {}, {}, {}
    for lever in RERANK_LEVERS:
        start = time.perf_counter()
        run(lever, nodes, stage0)  # warm-up (and the compilation of the compiled levers)
        first_call[lever] = time.perf_counter() - start
    for _ in range(repeats):
        for lever in RERANK_LEVERS:
            timed(lambda lever=lever: run(lever, nodes, stage0), repeats, lever, times, peaks)
    return times, peaks, first_call


def golden_accuracy(run: RerankerRun, golden_dir: Path) -> dict:
    """Per lever: the largest |logit - float64 golden| on the golden input, and whether its order holds."""
    nodes = torch.load(golden_dir / "reranker_io.pt", weights_only=True)["x_rerank"]  # (2, 4, 1200, 131)
    truth = torch.load(golden_dir / "reranker_io_f64.pt", weights_only=True)["logits"]  # (2, 3, 2)
    report = {}
    for lever, (_, autocast, per_call, _) in RERANK_LEVERS.items():
        stage0 = run.stage0(nodes, autocast)
        logits = []
        for first in range(0, len(nodes), per_call):
            part = slice(first, first + per_call)
            logits.append(run(lever, nodes[part], {attention: x[part] for attention, x in stage0.items()}))
        logits = torch.cat(logits).double()  # (2, 3, 2)
        order = logits.softmax(-1)[..., 1].argsort(-1)
        report[lever] = {
            "max_abs_logit_error_vs_f64": (logits - truth).abs().max().item(),
            "golden_order_holds": bool(torch.equal(order, truth.softmax(-1)[..., 1].argsort(-1))),
        }
    return report


def toy_part(checkpoint: Path, datasets_folder: Path, splits: list[str], top: int, work: Path) -> dict:
    """Each TOY_SETTINGS entry end to end against float32 + plain kernel + float32 store on the trained toy model."""
    model, _ = build_model(ModelConfig(), resume=str(checkpoint))
    model = model.eval()
    indexes = {name: load_split(SplitRequest(datasets_folder, "toy_world", name)) for name in splits}
    base = EvalSettings(model.config.image_size, torch.device("cpu"), infer_batch_size=32, num_workers=0,
                        rerank_top=top, rerank_batch_size=8, recall_values=[1, 5, 10, 20])  # fmt: skip
    reference_settings = replace(base, rerank_kernel="plain", store_dtype="float32")
    references = {name: evaluate(model, index, reference_settings, work) for name, index in indexes.items()}
    results = {}
    for label, overrides in TOY_SETTINGS.items():
        settings = replace(base, **overrides)
        per_split = {
            name: compare(references[name], evaluate(model, index, settings, work), index.soft_positives_per_query, top)
            for name, index in indexes.items()
        }
        results[label] = {"settings": overrides, **summarise(per_split), "per_split": per_split}
        print(label, json.dumps({k: v for k, v in results[label].items() if k != "per_split"}), flush=True)
    return results


def markdown(results: dict) -> str:
    rates = ", ".join(f"{dtype} {rate:.0f}" for dtype, rate in results["matmul_gflops"].items())
    lines = [f"machine: {results['machine']}", "", f"matmul 2400x384x1536: GFLOP/s {rates}", ""]
    if results.get("extraction"):
        lines += ["| extraction lever | s/image | peak RSS growth MB | max abs global diff | kept nodes changed % | "
                  "max abs local diff (nodes kept in both) |", "|---|---|---|---|---|---|"]  # fmt: skip
        for lever, row in results["extraction"].items():
            lines.append(f"| {lever} | {row['s_per_image']:.4f} | {row['peak_rss_growth_mb']:.0f} | "
                         f"{row['max_abs_global_diff']:.2e} | {row['kept_nodes_changed_pct']:.2f} | "
                         f"{row['max_abs_local_diff']:.2e} |")  # fmt: skip
        lines.append("")
    if results.get("reranking"):
        tops = results["settings"]["tops"]
        head = " | ".join(f"s/query top-{t} | peak MB top-{t}" for t in tops)
        lines += [f"| reranker lever | {head} | max abs logit error vs f64 golden | golden order | first call s |",
                  "|---|" + "---|" * (2 * len(tops) + 3)]  # fmt: skip
        for lever, row in results["reranking"].items():
            cells = " | ".join(
                f"{row[f's_per_query_top{t}']:.3f} | {row[f'peak_rss_growth_mb_top{t}']:.0f}" for t in tops
            )
            error = row.get("max_abs_logit_error_vs_f64")
            first = " / ".join(f"{row[f'first_call_s_top{t}']:.0f}" for t in tops if f"first_call_s_top{t}" in row)
            lines.append(f"| {lever} | {cells} | {'-' if error is None else f'{error:.2e}'} | "
                         f"{row.get('golden_order_holds', '-')} | {first or '-'} |")  # fmt: skip
        lines.append("")
    if results.get("toy"):
        lines += ["| toy model, against fp32 + plain | top-1 same % | dR@1 | dR@5 | dR@10 | meets the bar |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for label, row in results["toy"].items():
            change = row["recall_change"]
            lines.append(f"| {label} | {row['top1_unchanged_pct']:.2f} | {change['R@1']:.2f} | {change['R@5']:.2f} | "
                         f"{change['R@10']:.2f} | {row['meets_accuracy_bar']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="writes <out>.json and <out>.md")
    parser.add_argument("--golden_dir", type=Path, default=None, help="reference/golden: weights and f64 logits")
    parser.add_argument("--toy_checkpoint", type=Path, default=None, help="the toy-world demo's trained reranker")
    parser.add_argument("--datasets_folder", type=Path, default=Path("data"), help="holds toy_world/")
    parser.add_argument("--toy_splits", nargs="+", default=["test", "val", "train"], help="toy splits compared")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of every setting (alternating)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the 2-core target machine)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a micro DeiT at 128x128, top-3 and -5")
    parser.add_argument("--skip", nargs="*", default=[], choices=("extraction", "reranking", "toy"), help="parts")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    flags = sorted(cpu_flags() & {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx2"})
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = {
        "machine": f"{args.threads} threads, native bf16: {cpu_has_native_bf16()}, flags {flags}, "
        f"torch {torch.__version__}, load average at start {load}",
        "settings": {"smoke": args.smoke, "tops": [3, 5] if args.smoke else [10, 100], "repeats": args.repeats},
    }
    results["matmul_gflops"] = matmul_rates((2400, 384, 1536), max(args.repeats, 5))
    print("matmul 2400x384x1536 GFLOP/s:", results["matmul_gflops"], flush=True)
    if "extraction" not in args.skip:
        size, batch, backbone = ((128, 128), 2, "deit_micro") if args.smoke else ((480, 640), 4, "deit_small")
        results["extraction"] = extraction_part(size, batch, args.repeats, backbone)
    if "reranking" not in args.skip:
        grid, channels = ((8, 10), 35) if args.smoke else ((30, 40), 131)
        golden = None if args.smoke else args.golden_dir
        results["reranking"] = reranker_part(golden, results["settings"]["tops"], grid, channels, args.repeats)
    if args.toy_checkpoint is not None and "toy" not in args.skip:
        splits = ["test"] if args.smoke else args.toy_splits
        top = 5 if args.smoke else 20
        results["toy"] = toy_part(args.toy_checkpoint, args.datasets_folder, splits, top, Path(f"{args.out}_work"))
    results["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(results, indent=2))
    Path(f"{args.out}.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
