"""A fused L2-distance graph attention (Triton): the node graphs' ``softmax(-||q_i - h_j|| / T + lamda [i == j]) @ h``
in one pass over key blocks with an online softmax, never writing the (L, L) matrix.

Operands are rounded once to the precision of the tensor cores (TF32 or bf16) *before* the row norms are taken, so
the distances are exact distances between the rounded vectors up to float32 accumulation: two identical rows (a node
with itself, the identical zeroed nodes) stay at distance ~0 as in the float32 path, instead of the sqrt of a
rounding error of the dot product. "ieee" keeps float32 operands and float32 products (slow; accuracy reference).

Runs on CUDA; on the CPU only under ``TRITON_INTERPRET=1`` (Triton's interpreter; used by the tests). Inference
only: there is no backward.
"""

from __future__ import annotations

import math
import os

import torch

from util import PRGSError

try:  # an optional dependency: CUDA builds of torch ship it, CPU-only installs do not need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

PRECISIONS = ("ieee", "tf32", "bf16")
# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried on the first call for each shape; the fastest is kept
# (all three compile to Hopper's wgmma instructions for tf32 and bf16 with Triton 3.8; 32-row blocks do not)
CUDA_CONFIGS = ((64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2))
INTERPRETER_CONFIG = (32, 32, 1, 1)


class FusedKernelError(PRGSError, RuntimeError):
    """The fused kernel cannot run here (no Triton, no CUDA device); the message says what to use instead."""


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest TF32 value (10 mantissa bits, ties to even), still stored as float32, so that the
    tensor cores' own conversion of it is exact."""
    bits = x.contiguous().view(torch.int32)
    rounded = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF  # add half an ulp of TF32 (ties to even), cut 13 bits
    return rounded.view(torch.float32)


def split_width(dim: int) -> tuple[int, int]:
    """Feature width -> (D1, D2): the features are read as a power-of-two block D1 (>= 16) and a second block D2
    (>= 16, a power of two, 0 when D1 covers them): 131 -> (128, 16), 35 -> (32, 16), 32 -> (32, 0)."""
    first = max(16, 1 << (dim.bit_length() - 1))
    rest = dim - first
    return first, (0 if rest <= 0 else max(16, 1 << (rest - 1).bit_length()))


def l2_graph_attention(
    q: torch.Tensor, h: torch.Tensor, temperature: float, lamda: torch.Tensor, precision: str = "tf32"
) -> torch.Tensor:
    """q (B, 1 or N, L, C) queries (1: every image of a group is read from the group's first image, as the cross
    graphs do), h (B, N, L, C) keys and values -> softmax(-cdist(q, h) / temperature + lamda * I) @ h, (B, N, L, C)
    float32. The diagonal bonus ``lamda`` (a one-element tensor on h's device, read by the kernel: no host sync)
    applies to i == j, as in GraphLayer."""
    if precision not in PRECISIONS:
        raise ValueError(f"fused attention precision must be one of {PRECISIONS}, got {precision!r}")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if triton is None:
        raise FusedKernelError(
            "the fused reranker kernel needs Triton (pip install triton); or use --rerank_kernel stage0"
        )
    if h.device.type != "cuda" and not interpret:
        raise FusedKernelError(
            f"the fused reranker kernel runs on CUDA (got tensors on {h.device}); use --rerank_kernel stage0 on the CPU"
        )
    batch, group, length, dim = h.shape
    if q.shape not in ((batch, 1, length, dim), (batch, group, length, dim)):
        raise ValueError(f"queries {tuple(q.shape)} do not fit keys {tuple(h.shape)}")
    q_op, h_op = _operands(q, h, precision, sum(split_width(dim)))
    q_norm = q_op.float().square().sum(-1)  # (B, 1 or N, L): norms of the rounded operands, in float32
    h_norm = h_op.float().square().sum(-1)  # (B, N, L)
    out = torch.empty(batch, group, length, dim, device=h.device, dtype=torch.float32)
    lamda = lamda.detach().reshape(1).float()
    args = (q_op, h_op, q_norm, h_norm, lamda, out, group, length, dim, math.log2(math.e) / temperature)
    if interpret:
        _launch(args, precision, INTERPRETER_CONFIG, interpret=True)
    elif precision == "ieee":  # the accuracy reference: one configuration, no tuning (it compiles slowly)
        _launch(args, precision, CUDA_CONFIGS[-1], interpret=False)
    else:
        _launch(args, precision, _tuned_config(args, precision), interpret=False)
    return out


def _operands(q: torch.Tensor, h: torch.Tensor, precision: str, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q and h rounded to the dot products' input precision, zero-padded to ``width`` features (B, *, L, width) so
    that every row starts 16-byte aligned and the kernel reads whole blocks without column masks."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    padded = []
    for x in (q, h):
        x = x.float()
        x = round_to_tf32(x) if precision == "tf32" else x
        out = torch.zeros(*x.shape[:-1], width, device=x.device, dtype=dtype)
        out[..., : x.shape[-1]] = x
        padded.append(out)
    return padded[0], padded[1]


_TUNED: dict[tuple, tuple[int, int, int, int]] = {}
_TUNING_ERRORS: list[str] = []


def _tuned_config(args: tuple, precision: str) -> tuple[int, int, int, int]:
    """The fastest of CUDA_CONFIGS for this shape and precision, timed once per process (CUDA events)."""
    q_op, h_op = args[:2]
    key = (tuple(h_op.shape), q_op.shape[1], precision, h_op.device.index)
    if key not in _TUNED:
        timings = {}
        for config in CUDA_CONFIGS:
            try:
                _launch(args, precision, config, interpret=False)  # compile and warm up
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(3):
                    _launch(args, precision, config, interpret=False)
                end.record()
                torch.cuda.synchronize()
                timings[config] = start.elapsed_time(end)
            except Exception as error:  # noqa: BLE001 - a config that does not compile here (e.g. shared memory)
                timings[config] = math.inf
                _TUNING_ERRORS.append(f"{config}: {type(error).__name__}: {error}"[:300])
        best = min(timings, key=timings.get)
        if timings[best] == math.inf:
            raise FusedKernelError(f"no configuration of the fused kernel ran here: {_TUNING_ERRORS}")
        _TUNED[key] = best
    return _TUNED[key]


def tuned_configs() -> dict[str, str]:
    """What the tuning chose (for benchmark reports): shape key -> (BLOCK_M, BLOCK_N, warps, stages), and the
    configurations that failed."""
    return {**{str(k): str(v) for k, v in _TUNED.items()}, "errors": "; ".join(_TUNING_ERRORS)}


def _launch(args: tuple, precision: str, config: tuple[int, int, int, int], interpret: bool) -> None:
    q_op, h_op, q_norm, h_norm, lamda, out, group, length, dim, scale = args
    block_m, block_n, warps, stages = config
    d1, d2 = split_width(dim)
    grid = (triton.cdiv(length, block_m), h_op.shape[0] * group)
    _kernel(interpret)[grid](
        q_op, h_op, q_norm, h_norm, lamda, out,
        q_op.stride(0), q_op.stride(1) if q_op.shape[1] > 1 else 0, q_op.stride(2),
        h_op.stride(0), h_op.stride(1), h_op.stride(2),
        q_norm.stride(0), q_norm.stride(1) if q_norm.shape[1] > 1 else 0,
        h_norm.stride(0), h_norm.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        group, length, dim, scale,
        BLOCK_M=block_m, BLOCK_N=block_n, D1=d1, D2=max(d2, 16), HAS_D2=d2 > 0,
        PRECISION="ieee" if precision == "bf16" else precision,
        P_BF16=precision == "bf16", UPCAST=interpret and precision == "bf16",
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


_CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "D1", "D2", "HAS_D2", "PRECISION", "P_BF16", "UPCAST")
_KERNELS: dict[bool, object] = {}
# integer arguments whose values vary between the reranker's shapes: no specialisation on them (fewer compilations)
_NOT_SPECIALISED = ["stride_qnb", "stride_qnn", "stride_hnb", "stride_hnn", "stride_ob", "stride_on", "stride_ol",
                    "group", "length", "dim"]  # fmt: skip


def _kernel(interpret: bool):
    """The jitted kernel; jitted on first use so that TRITON_INTERPRET set by a test is honoured."""
    if interpret not in _KERNELS:
        # the annotations as objects, not the strings of ``from __future__ import annotations``: every Triton
        # version recognises tl.constexpr then
        _l2_attention_kernel.__annotations__ = {name: tl.constexpr for name in _CONSTEXPRS}
        _KERNELS[interpret] = triton.jit(_l2_attention_kernel, do_not_specialize=_NOT_SPECIALISED)
    return _KERNELS[interpret]


def _l2_attention_kernel(
    Q, H, QN, HN, LAMDA, OUT,
    stride_qb, stride_qn, stride_ql, stride_hb, stride_hn, stride_hl,
    stride_qnb, stride_qnn, stride_hnb, stride_hnn, stride_ob, stride_on, stride_ol,
    group, length, dim, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, HAS_D2: tl.constexpr,
    PRECISION: tl.constexpr, P_BF16: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M query rows of one graph (b, n) against every key block of that graph.

    logits in base 2: -sqrt(max(|q|^2 + |h|^2 - 2 q.h, 0)) * scale + lamda log2(e) [i == j], scale = log2(e) / T.
    The operands are zero-padded to D1 (+ D2) features, so only rows are masked."""
    diagonal = tl.load(LAMDA) * 1.4426950408889634  # lamda * log2(e)
    graph = tl.program_id(1)
    b, n = (graph // group).to(tl.int64), (graph % group).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols1 = tl.arange(0, D1)
    cols2 = D1 + tl.arange(0, D2)
    row_ok = rows < length
    q_base = Q + b * stride_qb + n * stride_qn
    h_base = H + b * stride_hb + n * stride_hn
    q1 = tl.load(q_base + rows[:, None] * stride_ql + cols1[None, :], row_ok[:, None], 0.0)
    q2 = tl.load(q_base + rows[:, None] * stride_ql + cols2[None, :], row_ok[:, None] & HAS_D2, 0.0)
    if UPCAST:  # Triton's interpreter multiplies bf16 bit patterns as integers: compute in float32 there
        q1, q2 = q1.to(tl.float32), q2.to(tl.float32)
    q_norm = tl.load(QN + b * stride_qnb + n * stride_qnn + rows, row_ok, 0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc1 = tl.zeros((BLOCK_M, D1), tl.float32)
    acc2 = tl.zeros((BLOCK_M, D2), tl.float32)
    for start in range(0, length, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < length
        k1 = tl.load(h_base + keys[:, None] * stride_hl + cols1[None, :], key_ok[:, None], 0.0)
        k2 = tl.load(h_base + keys[:, None] * stride_hl + cols2[None, :], key_ok[:, None] & HAS_D2, 0.0)
        if UPCAST:
            k1, k2 = k1.to(tl.float32), k2.to(tl.float32)
        dots = tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
        if HAS_D2:
            dots += tl.dot(q2, tl.trans(k2), input_precision=PRECISION)
        k_norm = tl.load(HN + b * stride_hnb + n * stride_hnn + keys, key_ok, 0.0)
        squared = q_norm[:, None] + k_norm[None, :] - 2.0 * dots
        logits = -tl.sqrt(tl.maximum(squared, 0.0)) * scale + tl.where(rows[:, None] == keys[None, :], diagonal, 0.0)
        logits = tl.where(key_ok[None, :], logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        correction = tl.exp2(m_i - m_new)
        p = tl.exp2(logits - m_new[:, None])
        l_i = l_i * correction + tl.sum(p, 1)
        p_op = p
        if P_BF16:  # the weights as bf16 tensor-core operands (rounded, then widened again in the interpreter)
            p_op = p.to(tl.bfloat16).to(tl.float32) if UPCAST else p.to(tl.bfloat16)
        acc1 = acc1 * correction[:, None] + tl.dot(p_op, k1, input_precision=PRECISION)
        if HAS_D2:
            acc2 = acc2 * correction[:, None] + tl.dot(p_op, k2, input_precision=PRECISION)
        m_i = m_new
    out_base = OUT + b * stride_ob + n * stride_on + rows[:, None] * stride_ol
    tl.store(out_base + cols1[None, :], acc1 / l_i[:, None], row_ok[:, None] & (cols1[None, :] < dim))
    if HAS_D2:
        tl.store(out_base + cols2[None, :], acc2 / l_i[:, None], row_ok[:, None] & (cols2[None, :] < dim))
