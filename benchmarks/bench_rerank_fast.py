"""GPU benchmark of the reranker's kernels (`--rerank_kernel`), all in one process: speed and peak memory at
top-100 x 1200 nodes for 1, 4 and 8 queries per call, the per-image cost of the precomputed stage 0, accuracy
against the float64 golden and against the plain float32 path on random inputs.

    python benchmarks/bench_rerank_fast.py --golden_dir ../shared/reference/golden --out OUT/reranker.json
    TRITON_INTERPRET=1 python benchmarks/bench_rerank_fast.py --smoke --out /tmp/smoke.json   # CPU, tiny sizes

Times are medians of CUDA-event-timed calls after warm-up (the fused kernel picks its block sizes during warm-up);
peak memory is torch.cuda.max_memory_allocated over the timed calls, inputs and weights included. Variants that fail
are recorded with their error and the run goes on; results are written after every variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_gpu import reranker_input, timed  # noqa: E402

from model import l2_attention  # noqa: E402
from model.reranker import RERANK_KERNELS, GraphReranker, RerankKernel  # noqa: E402
from reranking import CudaGraphCache  # noqa: E402


@dataclass
class Setup:
    """The sizes benchmarked: the reference's (GPU), or tiny ones that check the script on a CPU (--smoke)."""

    device: torch.device
    grid: tuple[int, int] = (30, 40)
    channels: int = 131
    candidates: int = 100
    kept: int = 1000

    def nodes(self, queries: int, seed: int = 0) -> torch.Tensor:
        """Random nodes (queries, 1 + candidates, L, C), the least attended rows zeroed (bench_gpu.reranker_input)."""
        return reranker_input(queries, self.candidates, self.grid, self.channels, self.kept, seed).to(self.device)


SMOKE = dict(grid=(8, 10), channels=35, candidates=5, kept=66)
KERNELS = {
    **RERANK_KERNELS,
    "stage0_channels_last": RerankKernel("stage0_channels_last", True, "cdist", True),
}  # (the kernel's "ieee" precision, float32 products, is left out: an accuracy reference that compiles slowly)
# (label, kernel, CUDA graphs, torch.compile)
VARIANTS = [
    ("plain", "plain", False, False),
    ("stage0", "stage0", False, False),
    ("stage0_channels_last", "stage0_channels_last", False, False),
    ("fused_tf32", "fused_tf32", False, False),
    ("fused_bf16", "fused_bf16", False, False),
    ("plain+graphs", "plain", True, False),
    ("stage0_channels_last+graphs", "stage0_channels_last", True, False),
    ("fused_tf32+graphs", "fused_tf32", True, False),
    ("fused_bf16+graphs", "fused_bf16", True, False),
]
COMPILED = [("stage0_channels_last+compile", "stage0_channels_last", False, True)]


def memory() -> tuple[int, int]:
    """(allocated, peak allocated) bytes on the GPU, (0, 0) without one."""
    if not torch.cuda.is_available():
        return 0, 0
    return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()


def reset_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def make_call(reranker: GraphReranker, setup: Setup, kernel: RerankKernel, graphs: bool, compiled: bool, nodes):
    """A no-argument callable running the reranker on ``nodes`` (raw nodes, or stage-0 rows for those kernels)."""

    def forward(x):
        return reranker(x, setup.grid, kernel)

    if compiled:
        forward = torch.compile(forward, dynamic=False)
    if graphs:
        forward = CudaGraphCache(forward)
    return lambda: forward(nodes)


def bench_variant(reranker, setup: Setup, variant, queries: int, nodes: dict, repeats: int) -> dict:
    label, kernel_name, graphs, compiled = variant
    kernel = KERNELS[kernel_name]
    row = {"variant": label, "kernel": kernel_name, "queries_per_call": queries, "cuda_graphs": graphs}
    inputs = nodes.get(("stage0", kernel.attention)) if kernel.precomputed_stage0 else nodes["raw"]
    if inputs is None:
        return {**row, "error": f"no stage-0 rows for attention {kernel.attention} (see the log)"}
    reset_memory()
    baseline = memory()[0]
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            call = make_call(reranker, setup, kernel, graphs, compiled, inputs)
            milliseconds, times = timed(call, repeats if queries > 1 else 2 * repeats)
    except Exception as error:  # noqa: BLE001 - record and go on to the next variant
        row["error"] = f"{type(error).__name__}: {error}"[:500]
        return row
    above_inputs = memory()[1] - baseline  # what the call allocates on top of everything held before it
    own = inputs.numel() * inputs.element_size() + sum(p.numel() * p.element_size() for p in reranker.parameters())
    row.update(
        ms_per_query=milliseconds / queries,
        ms_per_call_min_max=[min(times), max(times)],
        peak_gb=(above_inputs + own) / 1e9,  # as bench_gpu.py: the call's allocations + its input + the weights
        setup_and_timing_s=time.perf_counter() - start,
    )
    return row


def stage0_inputs(reranker: GraphReranker, setup: Setup, queries: int, seed: int = 0) -> dict:
    """Raw nodes (queries, 1 + K, L, C) and their stage-0 rows per attention (as a store gives them back)."""
    raw = setup.nodes(queries, seed)
    nodes = {"raw": raw}
    with torch.inference_mode():
        for attention in ("cdist", "tf32", "bf16"):
            try:
                flat = raw.flatten(0, 1).unsqueeze(1)  # each image alone, as at extraction
                nodes["stage0", attention] = reranker.stage0_self_graph(flat, setup.grid, attention).reshape(raw.shape)
            except Exception as error:  # noqa: BLE001 - the fused variants of that precision will fail and say why
                print(f"stage-0 rows with attention {attention} failed: {error}", flush=True)
    return nodes


def stage0_cost(reranker: GraphReranker, setup: Setup, repeats: int) -> list[dict]:
    """What precomputing stage 0 costs at extraction: ms per image at a batch of 64 images."""
    rows = []
    images = setup.nodes(64).flatten(0, 1)[:64].unsqueeze(1)  # (64, 1, L, C)
    for attention in ("cdist", "tf32", "bf16"):
        try:
            with torch.inference_mode():
                call = lambda a=attention: reranker.stage0_self_graph(images, setup.grid, a)  # noqa: E731
                milliseconds, _ = timed(call, repeats)
            rows.append({"attention": attention, "ms_per_image": milliseconds / 64})
        except Exception as error:  # noqa: BLE001
            rows.append({"attention": attention, "error": f"{type(error).__name__}: {error}"[:300]})
    return rows


def golden_accuracy(reranker: GraphReranker, golden_dir: Path, device: torch.device, smoke: bool = False) -> dict:
    """Each kernel on the golden input: max |logit - float64 golden| and whether the candidate order is the same
    (--smoke: the cdist kernels only; Triton's interpreter would take minutes at 1200 nodes)."""
    io = torch.load(golden_dir / "reranker_io.pt", weights_only=True)
    truth = torch.load(golden_dir / "reranker_io_f64.pt", weights_only=True)["logits"]
    nodes = io["x_rerank"].to(device)
    grid = (30, 40)
    report = {}
    for name, kernel in KERNELS.items():
        if smoke and kernel.fused:
            continue
        try:
            with torch.inference_mode():
                x = nodes
                if kernel.precomputed_stage0:
                    flat = nodes.flatten(0, 1).unsqueeze(1)
                    x = reranker.stage0_self_graph(flat, grid, kernel.attention).reshape(nodes.shape)
                logits = reranker(x, grid, kernel).double().cpu()
            report[name] = {
                "max_abs_logit_diff_vs_f64": (logits - truth).abs().max().item(),
                "same_order": bool(torch.equal(logits[..., 1].argsort(-1), truth[..., 1].argsort(-1))),
            }
        except Exception as error:  # noqa: BLE001
            report[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
    return report


def random_input_agreement(reranker: GraphReranker, setup: Setup) -> dict:
    """Each kernel against the plain float32 path on 4 random queries x top-100 (golden weights: near-tied scores,
    so order changes here say little; the trained toy model's check is bench_toy_accuracy.py)."""
    nodes = stage0_inputs(reranker, setup, 4, seed=1)
    with torch.inference_mode():
        plain = reranker(nodes["raw"], setup.grid).float()
    plain_top1 = plain[..., 1].argmax(-1)
    report = {}
    for name, kernel in KERNELS.items():
        key = ("stage0", kernel.attention) if kernel.precomputed_stage0 else "raw"
        if key not in nodes:
            continue
        with torch.inference_mode():
            logits = reranker(nodes[key], setup.grid, kernel).float()
        report[name] = {
            "max_abs_logit_diff_vs_plain": (logits - plain).abs().max().item(),
            "top1_agreement": float((logits[..., 1].argmax(-1) == plain_top1).float().mean()),
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--golden_dir", type=Path, default=None, help="../shared/reference/golden")
    parser.add_argument("--out", type=Path, required=True, help="JSON file, rewritten after every variant")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per variant (twice that at 1 query)")
    parser.add_argument("--deadline", type=float, default=0.0, help="unix time after which remaining parts are skipped")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (tens of seconds per shape)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script, times nothing")
    args = parser.parse_args()
    setup = Setup(torch.device("cpu"), **SMOKE) if args.smoke else Setup(torch.device("cuda"))
    reranker = GraphReranker(setup.channels, setup.grid).to(setup.device).eval()
    if args.golden_dir is not None and not args.smoke:
        reranker.load_state_dict(torch.load(args.golden_dir / "reranker_state_dict.pt", weights_only=True))
    results = {"device": torch.cuda.get_device_name() if not args.smoke else "cpu (smoke)", "torch": torch.__version__}
    results.update(setup=str(setup), rows=[])
    write = lambda: args.out.write_text(json.dumps(results, indent=2))  # noqa: E731
    if args.golden_dir is not None:
        golden = GraphReranker().to(setup.device).eval()
        golden.load_state_dict(torch.load(args.golden_dir / "reranker_state_dict.pt", weights_only=True))
        results["golden_accuracy"] = golden_accuracy(golden, args.golden_dir, setup.device, args.smoke)
        write()
    run_speed(reranker, setup, args, results, write)
    results["stage0_cost"] = stage0_cost(reranker, setup, args.repeats)
    results["random_input_agreement"] = random_input_agreement(reranker, setup)
    results["tuned_configs"] = l2_attention.tuned_configs()
    write()
    print_table(results)


def run_speed(reranker, setup: Setup, args, results: dict, write) -> None:
    variants = VARIANTS + (COMPILED if args.compile else [])
    for queries in (1,) if args.smoke else (1, 8, 4):  # 8: what test.py's fast settings use; 4 last
        nodes = stage0_inputs(reranker, setup, queries)
        for variant in variants:
            if variant[3] and queries != 1:
                continue  # torch.compile: one shape only
            if args.deadline and time.time() > args.deadline:
                results["rows"].append({"variant": variant[0], "queries_per_call": queries, "error": "deadline"})
                continue
            row = bench_variant(reranker, setup, variant, queries, nodes, args.repeats)
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            write()
        del nodes


def print_table(results: dict) -> None:
    print(f"\nreranker, {results['setup']}, {results['device']}, torch {results['torch']}")
    print(f"{'variant':32s} {'q/call':>6s} {'ms/query':>9s} {'peak GB':>8s}")
    for row in results["rows"]:
        if "error" in row:
            print(f"{row['variant']:32s} {row['queries_per_call']:6d}  error: {row['error'][:60]}")
        else:
            print(f"{row['variant']:32s} {row['queries_per_call']:6d} {row['ms_per_query']:9.2f} {row['peak_gb']:8.2f}")
    for name, report in results.get("golden_accuracy", {}).items():
        print(f"golden {name:22s} {report}")
    print("stage-0 cost at extraction:", results["stage0_cost"])


if __name__ == "__main__":
    main()
