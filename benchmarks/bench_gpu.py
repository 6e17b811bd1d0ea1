"""GPU benchmark and checks: reranker and backbone speed and memory, bf16 accuracy, GPU-vs-CPU golden parity.

    python benchmarks/bench_gpu.py --golden_dir ../shared/reference/golden --out bench_gpu.json

Times are medians of CUDA-event-timed repetitions after warm-up; peak memory is torch.cuda.max_memory_allocated.
Reference figures (DESIGN.md, one H100, torch 2.11, the reference code, random weights): reranker 19.0 ms/query fp32,
18.4 ms bf16, 17.9 ms/query at 4 queries per call, peak 2.56 GB (1 query) / 10.1 GB (4); DeiT-S at 480x640,
batch 64: 491 images/s fp32, 2518 images/s bf16. Results are recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.backbone import DeiTBackbone  # noqa: E402
from model.network import ModelConfig, PRGSNetwork  # noqa: E402
from model.reranker import GraphReranker  # noqa: E402


def timed(function, repeats: int, warmup: int = 3) -> tuple[float, list[float]]:
    """(median, all) milliseconds of ``function()`` over ``repeats`` CUDA-event-timed calls after ``warmup`` (host
    clock without CUDA, for --smoke)."""
    for _ in range(warmup):
        function()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if not cuda:
            start = time.perf_counter()
            function()
            times.append(1000 * (time.perf_counter() - start))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), times


def reranker_input(
    queries: int, candidates: int = 100, grid=(30, 40), channels: int = 131, kept: int = 1000, seed: int = 0
) -> torch.Tensor:
    """Random nodes (queries, 1 + candidates, h*w, C) with the least 'attended' rows zeroed, as real local features."""
    generator = torch.Generator().manual_seed(seed)
    nodes = torch.randn(queries, 1 + candidates, grid[0] * grid[1], channels, generator=generator)
    order = torch.rand(queries, 1 + candidates, grid[0] * grid[1], generator=generator).argsort(-1)
    nodes.scatter_(2, order[..., kept:, None].expand(-1, -1, -1, channels), 0.0)
    return nodes


def bench_reranker(reranker: GraphReranker, repeats: int) -> list[dict]:
    rows = []
    for queries in (1, 4):
        nodes = reranker_input(queries).cuda()
        for label, precision in (("fp32", "fp32"), ("bf16 autocast", "bf16")):

            def run(nodes=nodes, precision=precision):
                with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=precision == "bf16"):
                    return reranker(nodes, (30, 40))

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                milliseconds, _ = timed(run, repeats)
            except torch.OutOfMemoryError:
                rows.append({"queries_per_call": queries, "path": label, "error": "out of memory"})
                continue
            rows.append(
                {
                    "queries_per_call": queries,
                    "path": label,
                    "ms_per_query": milliseconds / queries,
                    "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
                }
            )
            print(
                f"reranker {queries} q/call {label:13s}: {milliseconds / queries:7.2f} ms/query, "
                f"peak {rows[-1]['peak_gb']:.2f} GB",
                flush=True,
            )
        del nodes
    return rows


def reranker_accuracy(reranker: GraphReranker, golden_dir: Path | None) -> dict:
    """bf16 autocast against float32 on the GPU, and the GPU against the golden CPU logits."""
    report = {}
    nodes = reranker_input(4, seed=1).cuda()
    with torch.inference_mode():
        plain = reranker(nodes, (30, 40))
        with torch.autocast("cuda", torch.bfloat16):
            plain_bf16 = reranker(nodes, (30, 40)).float()
    order = plain[..., 1].argsort(-1, descending=True)
    for label, other in (("bf16_vs_fp32", plain_bf16),):
        probability = other.softmax(-1)[..., 1]
        report[label] = {
            "max_abs_logit_diff": (other - plain).abs().max().item(),
            "same_order": bool(torch.equal(probability.argsort(-1, descending=True), order)),
            "top1_agreement": float((probability.argmax(-1) == order[:, 0]).float().mean()),
        }
    if golden_dir is not None:
        io = torch.load(golden_dir / "reranker_io.pt", weights_only=True)
        with torch.inference_mode():
            gpu = reranker(io["x_rerank"].cuda(), (30, 40)).cpu()
        report["gpu_fp32_vs_golden_cpu"] = (gpu - io["logits"]).abs().max().item()
    print("reranker accuracy:", json.dumps(report), flush=True)
    return report


def bench_backbone(repeats: int) -> list[dict]:
    """PRGSNetwork forward (global + local) with DeiT-S at 480x640, batch 64; and the same with the reference's
    attention (explicit softmax in every block, the last block's attention computed a second time)."""
    rows = []
    network = PRGSNetwork(ModelConfig()).cuda().eval()
    images = torch.randn(64, 3, 480, 640, device="cuda")
    for label, precision in (("ours fp32", "fp32"), ("ours bf16", "bf16")):

        def run(precision=precision):
            with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=precision == "bf16"):
                return network(images)

        milliseconds, _ = timed(run, repeats, warmup=2)
        rows.append({"path": label, "images_per_s": 64 / (milliseconds / 1000)})
        print(f"backbone {label}: {rows[-1]['images_per_s']:.0f} images/s", flush=True)
    for block in network.backbone.blocks:
        block.attn.fused_attn = False  # timm's explicit attention, as timm 0.5.4 in the reference

    def reference_style(precision):
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=precision == "bf16"):
            out = network(images)
            x = torch.randn(64, 1202, 384, device="cuda")  # the reference recomputes the last attention
            attn = network.backbone.blocks[-1].attn
            qkv = attn.qkv(network.backbone.blocks[-1].norm1(x)).reshape(64, 1202, 3, 6, 64).permute(2, 0, 3, 1, 4)
            ((qkv[0] * attn.scale) @ qkv[1].transpose(-2, -1)).softmax(-1)
            return out

    for label, precision in (("reference-style fp32", "fp32"), ("reference-style bf16", "bf16")):
        milliseconds, _ = timed(lambda precision=precision: reference_style(precision), repeats, warmup=2)
        rows.append({"path": label, "images_per_s": 64 / (milliseconds / 1000)})
        print(f"backbone {label}: {rows[-1]['images_per_s']:.0f} images/s", flush=True)
    return rows


def golden_backbone_on_gpu(golden_dir: Path) -> float:
    io = torch.load(golden_dir / "small_backbone_io.pt", weights_only=True)
    config = io["config"]
    backbone = DeiTBackbone(
        tuple(config["img_size"]), config["embed_dim"], config["depth"], config["num_heads"], config["fc_output_dim"]
    )
    network = PRGSNetwork(
        ModelConfig(local_dim=config["local_dim"], num_kept_nodes=config["num_local_nomask"]), backbone=backbone
    )
    network.load_state_dict(torch.load(golden_dir / "small_backbone_state_dict.pt", weights_only=True), strict=False)
    with torch.inference_mode():
        global_descriptor, local = network.cuda().eval()(io["images"].cuda())
    difference = max(
        (global_descriptor.cpu() - io["global"]).abs().max().item(), (local.cpu() - io["local"]).abs().max().item()
    )
    print(f"small backbone on the GPU vs golden CPU: max abs diff {difference:.2e}", flush=True)
    return difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--golden_dir", type=Path, default=None, help="../shared/reference/golden, for the parity rows")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions per configuration")
    parser.add_argument("--out", type=Path, default=Path("bench_gpu.json"), help="where to write the results")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("reranker", "backbone"),
        default=["reranker", "backbone"],
        help="what to benchmark",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device")
    results = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }
    print(results, flush=True)
    torch.manual_seed(0)
    reranker = GraphReranker().cuda().eval()
    if args.golden_dir is not None:
        state = torch.load(args.golden_dir / "reranker_state_dict.pt", weights_only=True)
        reranker.load_state_dict(state)
        results["golden_backbone_gpu_max_abs_diff"] = golden_backbone_on_gpu(args.golden_dir)
    if "reranker" in args.parts:
        results["reranker_accuracy"] = reranker_accuracy(reranker, args.golden_dir)
        results["reranker"] = bench_reranker(reranker, args.repeats)
        args.out.write_text(json.dumps(results, indent=2))
    if "backbone" in args.parts:
        results["backbone"] = bench_backbone(max(3, args.repeats // 2))
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
