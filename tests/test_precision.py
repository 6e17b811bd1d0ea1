"""--precision auto picks bfloat16 only where the hardware multiplies it, says why, and refuses unknown names; the
CPU's bfloat16 graph attention stays close to the float32 one (it runs on any CPU: emulated where not native);
config.eval_settings resolves each stage and the kernel, and records what ran; bfloat16 and float32 evaluations of
the trained toy model agree within measured bounds."""

import dataclasses
import logging

import numpy as np
import pytest
import torch

from config import EvalSettings, eval_settings
from datasets_ws import SplitRequest, load_split
from evaluation import evaluate
from model import precision
from model.bf16_attention import bf16_graph_attention, split_bf16, squared_distances_bf16
from model.checkpoint import build_model
from model.network import ModelConfig
from model.precision import cpu_flags, cpu_has_native_bf16, resolve_precision
from model.reranker import GraphLayer, GraphReranker, rerank_kernel
from parser import parse_test_args


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)


@pytest.fixture
def cpu_with_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)


def test_auto_falls_back_to_fp32_on_a_cpu_without_native_bf16_and_logs_why(cpu_without_bf16, caplog):
    with caplog.at_level(logging.INFO, logger="model.precision"):
        assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert "fp32" in caplog.text and "no native bfloat16" in caplog.text


def test_auto_picks_bf16_on_a_cpu_with_native_bf16(cpu_with_bf16, monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    with caplog.at_level(logging.INFO, logger="model.precision"):
        assert resolve_precision("auto", "cpu") == "bf16"
    assert "avx512_bf16" in caplog.text


@pytest.mark.parametrize("stage", ["extraction", "reranking"])
def test_auto_runs_a_stage_in_bf16_only_where_it_meets_the_accuracy_bar(cpu_with_bf16, monkeypatch, stage, caplog):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(precision, "AUTO_BF16_STAGES", {"extraction": False, "reranking": False})
    with caplog.at_level(logging.INFO, logger="model.precision"):
        assert resolve_precision("auto", "cpu", stage) == "fp32"
    assert "accuracy bar" in caplog.text
    monkeypatch.setattr(precision, "AUTO_BF16_STAGES", {"extraction": True, "reranking": True})
    assert resolve_precision("auto", "cpu", stage) == "bf16"
    assert resolve_precision("bf16", "cpu", stage) == "bf16"  # an explicit choice is kept
    with pytest.raises(ValueError, match="extraction, reranking"):
        resolve_precision("auto", "cpu", "training")


@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp32")])
def test_auto_on_cuda_follows_the_tensor_cores(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    assert resolve_precision("auto", torch.device("cuda")) == expected


def test_explicit_precisions_are_kept_and_emulated_bf16_is_warned_about(cpu_without_bf16, caplog):
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    with caplog.at_level(logging.WARNING, logger="model.precision"):
        assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert "emulated" in caplog.text


@pytest.mark.parametrize("name", ["float32", "fp16", "BF16", "", "tf32"])
def test_unknown_precisions_are_refused_with_the_choices(name):
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        resolve_precision(name, torch.device("cpu"))


def test_cpu_flags_reads_the_flags_lines_and_survives_a_missing_file(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx512f", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_the_detector_answers_on_this_machine():
    assert isinstance(cpu_has_native_bf16(), bool)


# ----------------------------------------------------------------------------------------------------------------
# The bfloat16 graph attention (model/bf16_attention.py) beside the plain torch.cdist one


def test_split_bf16_parts_add_up_to_the_float32_value():
    x = torch.randn(1000, dtype=torch.float64).exp().float() * 100  # squared norms: positive, wide range
    parts = split_bf16(x)
    assert parts.dtype == torch.bfloat16 and parts.shape == (1000, 3)
    torch.testing.assert_close(parts.double().sum(-1), x.double(), rtol=2**-23, atol=0)


def test_bf16_distances_keep_identical_rows_near_zero_and_others_within_bf16_rounding():
    """Identical rows (a node and itself, the zeroed nodes) stay at ~0 as in float32, instead of ~6% of their norm
    apart (bfloat16 dot products alone); other distances are the rounded rows' within 0.2% (one bfloat16 rounding)."""
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 64, 35, generator=generator) * 3
    h[:, :, 40:] = h[:, :, 40:41]  # 24 identical rows per image, as the zeroed nodes after a linear layer
    distances = squared_distances_bf16(h, h).float().clamp(min=0).sqrt()  # (2, 3, 64, 64)
    rounded = h.bfloat16().double()
    exact = torch.cdist(rounded, rounded)
    norm = h.norm(dim=-1).max().item()
    assert distances.diagonal(dim1=-2, dim2=-1).max() < 3e-3 * norm
    assert distances[..., 40:, 40:].max() < 3e-3 * norm
    off = exact > 0.1 * norm
    assert ((distances.double() - exact).abs()[off] / exact[off]).max() < 4e-3


@pytest.mark.parametrize("mode", ["self", "cross"])
def test_bf16_attention_is_close_to_the_plain_attention(mode):
    """Against the plain path in float64: bfloat16 operands (8 bits) move the aggregated features by < 2% of their
    scale (measured 0.3% on the golden reranker's stage 0)."""
    layer = GraphLayer(35, mode).eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 80, 35, generator=generator)
    x[:, :, 60:] = 0  # the zeroed nodes
    with torch.inference_mode():
        h = layer.linear(x)
        q = h[:, :1] if mode == "cross" else h
        fast = bf16_graph_attention(q, h, layer.temperature, layer.lamda)
        plain = GraphLayer._cdist_attention(layer.double(), q.double(), h.double())
    assert fast.dtype == torch.float32 and fast.shape == h.shape
    assert (fast.double() - plain).abs().max() < 2e-2 * plain.abs().max()


def test_the_stage0_bf16_kernel_keeps_the_golden_order_within_1e_2_of_the_float64_logits(golden_dir):
    """The whole reranker with the bfloat16 attention (linear layers float32): measured 2.1e-3 from the float64
    golden (float32: 2.0e-4; bf16 autocast of the linear layers too: 1.5e-2)."""
    reranker = GraphReranker().eval()
    reranker.load_state_dict(torch.load(golden_dir / "reranker_state_dict.pt", weights_only=True))
    nodes = torch.load(golden_dir / "reranker_io.pt", weights_only=True)["x_rerank"]  # (2, 4, 1200, 131)
    truth = torch.load(golden_dir / "reranker_io_f64.pt", weights_only=True)["logits"]
    kernel = rerank_kernel("stage0_bf16")
    assert kernel.precomputed_stage0 and not kernel.fused
    with torch.inference_mode():
        stage0 = reranker.stage0_self_graph(nodes.flatten(0, 1).unsqueeze(1), (30, 40), kernel.attention)
        logits = reranker(stage0.reshape(nodes.shape), (30, 40), kernel).double()
    torch.testing.assert_close(logits, truth, rtol=0, atol=1e-2)
    assert torch.equal(logits[..., 1].argsort(-1), truth[..., 1].argsort(-1))


def test_the_bf16_attention_is_for_inference_only():
    layer = GraphLayer(11, "self")
    with pytest.raises(ValueError, match="inference only"):
        layer(torch.randn(1, 2, 49, 11), "bf16_matmul")


# ----------------------------------------------------------------------------------------------------------------
# --precision through config.eval_settings: what each stage runs, and what results.json records


def _eval_settings(*flags: str):
    return eval_settings(parse_test_args(["--num_workers", "0", *flags]), torch.device("cpu"))


def test_auto_evaluates_in_fp32_on_a_cpu_without_native_bf16_and_logs_it_once(cpu_without_bf16, caplog):
    with caplog.at_level(logging.INFO, logger="model.precision"):
        settings = _eval_settings()
    assert (settings.precision, settings.reranking_precision, settings.rerank_kernel) == ("fp32", "fp32", "stage0")
    assert settings.precision_choice.requested == "auto"
    assert "no native bfloat16" in settings.precision_choice.reason
    assert len(caplog.records) == 1 and "extraction fp32, reranking fp32" in caplog.text


def test_auto_keeps_fp32_on_a_cpu_with_native_bf16_while_the_stages_miss_the_bar(cpu_with_bf16, monkeypatch):
    monkeypatch.setattr(precision, "AUTO_BF16_STAGES", {"extraction": False, "reranking": False})
    settings = _eval_settings()
    assert (settings.precision, settings.reranking_precision, settings.rerank_kernel) == ("fp32", "fp32", "stage0")
    assert "accuracy bar" in settings.precision_choice.reason


def test_auto_with_the_stages_switched_on_runs_bf16_extraction_and_the_stage0_bf16_kernel(cpu_with_bf16, monkeypatch):
    """On the CPU, auto's bfloat16 reranking is the stage0_bf16 kernel's products, without autocast; an explicit
    --precision bf16 keeps the auto kernel (stage0) under bfloat16 autocast, and an explicit kernel is kept."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(precision, "AUTO_BF16_STAGES", {"extraction": True, "reranking": True})
    settings = _eval_settings()
    assert (settings.precision, settings.reranking_precision, settings.rerank_kernel) == ("bf16", "fp32", "stage0_bf16")
    assert settings.resolved()["precision"] == {
        "requested": "auto",
        "extraction": "bf16",
        "reranking": "bf16",
        "reason": "this CPU multiplies bfloat16 in hardware (avx512_bf16)",
    }
    explicit = _eval_settings("--precision", "bf16")
    assert (explicit.precision, explicit.reranking_precision, explicit.rerank_kernel) == ("bf16", "bf16", "stage0")
    assert _eval_settings("--rerank_kernel", "plain").rerank_kernel == "plain"
    fp32 = _eval_settings("--precision", "fp32")
    assert (fp32.precision, fp32.reranking_precision, fp32.rerank_kernel) == ("fp32", "fp32", "stage0")


def test_settings_built_in_code_record_their_precisions():
    settings = EvalSettings((144, 192), torch.device("cpu"), precision="bf16", rerank_kernel="stage0")
    resolved = settings.resolved()
    assert resolved["precision"]["extraction"] == "bf16" and resolved["precision"]["reranking"] == "fp32"
    assert resolved["rerank_kernel"] == "stage0" and isinstance(resolved["cpu_native_bf16"], bool)


def test_bf16_and_fp32_agree_on_the_trained_toy_model(small_toy_world, trained_toy_checkpoint, tmp_path):
    """Evaluations of the toy world's test split (12 queries) against float32 (kernel stage0, float32 store).
    stage0_bf16 keeps every reranked top-1 (measured 12/12 here and 40/40 over the three splits, scores within
    1.6e-2); bf16 autocast everywhere keeps the global top-1 (12/12; 15/16 on the train split) but moves the steep
    toy reranker's scores by up to 0.8 and keeps only 8/12 reranked top-1 (9/12 val, 4/16 train): why "auto" keeps
    float32 for both stages (model.precision.AUTO_BF16_STAGES)."""
    model, _ = build_model(ModelConfig(), resume=trained_toy_checkpoint)
    index = load_split(SplitRequest(small_toy_world, "toy_world", "test"))
    fp32 = EvalSettings(
        (144, 192), torch.device("cpu"), infer_batch_size=16, num_workers=0, rerank_top=20, rerank_batch_size=4,
        rerank_kernel="stage0", store_dtype="float32",
    )  # fmt: skip
    variants = {
        "fp32": fp32,
        "stage0_bf16": dataclasses.replace(fp32, rerank_kernel="stage0_bf16"),
        "bf16": dataclasses.replace(fp32, precision="bf16", reranking_precision="bf16"),
    }
    runs = {name: evaluate(model.eval(), index, settings, tmp_path) for name, settings in variants.items()}

    def top1_agreement(name: str, ranking: str) -> float:
        return float(np.mean(getattr(runs[name], ranking)[:, 0] == getattr(runs["fp32"], ranking)[:, 0]))

    assert top1_agreement("stage0_bf16", "global_predictions") == 1.0  # the same extraction
    assert top1_agreement("stage0_bf16", "reranked_predictions") >= 10 / 12
    np.testing.assert_allclose(runs["stage0_bf16"].rerank_scores, runs["fp32"].rerank_scores, atol=5e-2)
    assert top1_agreement("bf16", "global_predictions") >= 10 / 12
    assert top1_agreement("bf16", "reranked_predictions") >= 4 / 12
