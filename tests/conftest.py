"""Shared fixtures: the golden reference outputs in ../shared and a small, fast configuration."""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # the fused reranker kernel's tests run in Triton's interpreter, which must be chosen before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO_ROOT.parent / "shared" / "reference" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Folder of the reference's golden outputs; tests that need it skip when ../shared is absent."""
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden fixtures not found at {GOLDEN_DIR} (../shared is absent from this checkout)")
    return GOLDEN_DIR


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def small_toy_world(tmp_path_factory) -> Path:
    """A datasets folder holding the toy world's 'small' preset (160 images), generated once per session."""
    from places import toy_world

    folder = tmp_path_factory.mktemp("datasets")
    toy_world.make_toy_world(folder, toy_world.PRESETS["small"], progress=False)
    return folder


@pytest.fixture(scope="session")
def trained_toy_checkpoint(small_toy_world, tmp_path_factory) -> Path:
    """A toy-preset model whose local_head + reranker were trained for 200 steps on the small toy world (past the
    reranker's slow start), so its scores vary between candidates. Built from train_reranking's pieces, without the
    per-epoch validation that would make it slow."""
    import numpy as np

    import losses
    import training
    from datasets_ws import SplitRequest, load_split
    from extraction import ExtractionSettings, FrozenBackboneCache
    from mining import TupleMiner
    from model.checkpoint import save_model
    from model.network import ModelConfig, PRGSNetwork

    torch.manual_seed(1)
    model = PRGSNetwork(ModelConfig(backbone="deit_micro", image_size=(144, 192), local_dim=32))
    index = load_split(SplitRequest(small_toy_world, "toy_world", "train"))
    trainable = training.configure_stage(model, "reranker")
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.03)
    cache = FrozenBackboneCache(model, index, ExtractionSettings((144, 192), torch.device("cpu"), 32, 0, "fp32"))
    miner = TupleMiner(index, "partial", negs_num_per_query=4, neg_samples_num=30)
    rng = np.random.default_rng(1)
    training.set_train_mode(model, "reranker")
    for _ in range(200):
        tuples = miner.mine(
            rng.choice(index.queries_num, 4, replace=False),
            rng,
            lambda ids: cache.descriptors[ids],
            global_model_frozen=True,
        )
        ids = torch.from_numpy(
            np.concatenate(
                [index.database_num + tuples.queries[:, None], tuples.positives[:, None], tuples.negatives], axis=1
            )
        )
        local = cache.local(model, ids.flatten(), torch.device("cpu"))
        loss = losses.rerank_loss(model, local.reshape(*ids.shape, *local.shape[1:]), model.config.grid)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("trained") / "reranker.pth"
    save_model(model.eval(), path)
    return path


@pytest.fixture(scope="module")
def interrupted_run(small_toy_world, tmp_path_factory) -> Path:
    """A training run stopped by --max_steps 5 in its second epoch (4 steps of 4 tuples each): epoch 0 validated
    (best.pth), last.pth after the first step of a mining round of 8 tuples."""
    # imported here, not at the top: the project's modules import Triton, which must see TRITON_INTERPRET first
    from short_runs import FAST, TRAIN

    import train_reranking

    folder = tmp_path_factory.mktemp("interrupted") / "run"
    train_reranking.main(
        ["--datasets_folder", str(small_toy_world), "--output_folder", str(folder), "--epochs_num", "2"]
        + ["--max_steps", "5", *TRAIN, *FAST]
    )
    return folder
