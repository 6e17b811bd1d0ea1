"""The toy-world demo in small (train_reranking.sh, docs/toy_world.md): a trained reranker beats global retrieval."""

import dataclasses

import pytest

import train_reranking
from places.toy_world import PRESETS, SplitSpec, make_toy_world

DEFAULT = PRESETS["default"]
# The default world's look-alikes, lighting and occlusions on fewer, shorter streets: 472 training images, a
# validation split of 120 queries (one query is 0.8 points) and a token test split.
DEMO_IN_SMALL = dataclasses.replace(
    DEFAULT,
    train=SplitSpec(6, 324.0, 42, 8, 500_000.0, 5_030_000.0),
    val=SplitSpec(2, 324.0, 60, 2, 510_000.0, 5_030_000.0),
    test=SplitSpec(1, 54.0, 2, 0, 520_000.0, 5_030_000.0),
)


@pytest.mark.slow
def test_trained_reranker_beats_global_retrieval_on_validation(tmp_path):
    """The demo's reranker stage, shortened: 240 steps on a frozen, untrained backbone (its global descriptor is
    the retrieval to beat), then one validation. Expected about +20 points of R@1 over global retrieval; the paired
    standard error on 120 queries is about 5, so asserting +7 leaves room for float32 differences between CPUs."""
    make_toy_world(tmp_path, DEMO_IN_SMALL, progress=False)
    results = train_reranking.main(
        [
            "--datasets_folder",
            str(tmp_path),
            "--output_folder",
            str(tmp_path / "run"),
            "--backbone_weights",
            "none",
            "--train_stage",
            "reranker",
            "--cache_frozen_backbone",
            "--mining",
            "partial",
            "--neg_samples_num",
            "100",
            "--negs_num_per_query",
            "8",
            "--queries_per_epoch",
            "1920",
            "--cache_refresh_rate",
            "240",
            "--epochs_num",
            "1",
            "--lr",
            "1e-3",
            "--num_workers",
            "0",
            "--recall_values",
            "1",
            "5",
            "--seed",
            "0",
        ]
    )
    validation = results["history"][-1]["val"]
    global_r1, reranked_r1 = validation["global"]["R@1"], validation["reranked"]["R@1"]
    assert reranked_r1 - global_r1 >= 7.0, f"val R@1: global {global_r1:.2f}, reranked {reranked_r1:.2f}"
