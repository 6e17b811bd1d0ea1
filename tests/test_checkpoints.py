"""Checkpoints: the reference's two released layouts load strictly; ours rebuild their model; writes are atomic."""

import argparse
import dataclasses
import json

import pytest
import torch

import util
from config import MODEL_FLAGS, checkpoint_model_flags, model_config_from_args, preset_text
from model import checkpoint as checkpoints
from model.network import ModelConfig, PRGSNetwork


def _stand_in(keys: dict, prefix: str, generator: torch.Generator) -> dict:
    return {f"{prefix}{name}": torch.randn(*shape, generator=generator) for name, shape in keys.items()}


@pytest.fixture(scope="module")
def full_keys(golden_dir):
    return json.loads((golden_dir / "full_model_keys.json").read_text())


@pytest.fixture(scope="module")
def reference_model():
    return PRGSNetwork(ModelConfig())  # DeiT-S distilled at 480x640, the reference's configuration


def test_reference_full_checkpoint_loads_every_key(full_keys, reference_model, tmp_path):
    generator = torch.Generator().manual_seed(0)
    weights = _stand_in(full_keys, "module.", generator)
    path = tmp_path / "msls_train_prgs.pt"
    torch.save(
        {
            "model_state_dict": weights,
            "epoch_num": 3,
            "optimizer_state_dict": {},
            "recalls": None,
            "best_r5": 0.0,
            "not_improved_num": 0,
        },
        path,
    )
    checkpoint = checkpoints.open_checkpoint(path)
    assert checkpoint.layout == "reference_full" and checkpoint.model_config is None
    checkpoints.load_weights(reference_model, checkpoint)
    ours = reference_model.state_dict()
    assert len(ours) == len(full_keys) == 242
    for name, value in weights.items():
        key = name.removeprefix("module.").replace("Reranker.", "reranker.", 1)
        assert torch.equal(ours[key], value), key


def test_reference_global_only_checkpoint_loads_the_backbone(full_keys, reference_model, tmp_path):
    generator = torch.Generator().manual_seed(1)
    backbone_keys = {k.removeprefix("backbone."): v for k, v in full_keys.items() if k.startswith("backbone.")}
    weights = _stand_in(backbone_keys, "module.", generator)
    path = tmp_path / "msls_v2_deits.pth"
    torch.save({"model_state_dict": weights, "epoch_num": 10}, path)
    checkpoint = checkpoints.open_checkpoint(path)
    assert checkpoint.layout == "reference_global"
    checkpoints.load_weights(reference_model, checkpoint)
    ours = reference_model.state_dict()
    for name, value in weights.items():
        assert torch.equal(ours["backbone." + name.removeprefix("module.")], value), name


def test_a_wrong_shape_or_a_missing_key_is_named(full_keys, reference_model, tmp_path):
    generator = torch.Generator().manual_seed(2)
    weights = _stand_in(full_keys, "module.", generator)
    weights["module.local_head.weight"] = torch.randn(64, 384)
    path = tmp_path / "wrong_shape.pt"
    torch.save({"model_state_dict": weights}, path)
    with pytest.raises(
        checkpoints.CheckpointError,
        match=r"1 mis-shaped key\(s\): local_head.weight: file \(64, 384\), "
        r"model \(128, 384\)",
    ):
        checkpoints.load_weights(reference_model, checkpoints.open_checkpoint(path))

    del weights["module.Reranker.classifier.bias"]
    weights["module.local_head.weight"] = torch.randn(128, 384)
    path = tmp_path / "missing.pt"
    torch.save({"model_state_dict": weights}, path)
    with pytest.raises(checkpoints.CheckpointError, match=r"1 missing key\(s\): reranker.classifier.bias"):
        checkpoints.load_weights(reference_model, checkpoints.open_checkpoint(path))

    backbone_only = {k: v for k, v in _stand_in(full_keys, "module.", generator).items() if "backbone." in k}
    backbone_only = {k.replace("module.backbone.", "module."): v for k, v in backbone_only.items()}
    backbone_only.pop("module.blocks.5.mlp.fc1.bias")
    path = tmp_path / "global_missing.pt"
    torch.save({"model_state_dict": backbone_only}, path)
    with pytest.raises(checkpoints.CheckpointError, match=r"missing key\(s\): backbone.blocks.5.mlp.fc1.bias"):
        checkpoints.load_weights(reference_model, checkpoints.open_checkpoint(path))


def test_non_strict_load_skips_and_logs(reference_model, tmp_path, caplog):
    weights = {f"module.{k}": v.clone() for k, v in reference_model.state_dict().items()}
    weights["module.extra.thing"] = torch.zeros(3)
    path = tmp_path / "extra.pt"
    torch.save({"model_state_dict": weights}, path)
    with pytest.raises(checkpoints.CheckpointError, match="unexpected key"):
        checkpoints.load_weights(reference_model, checkpoints.open_checkpoint(path))
    checkpoints.load_weights(reference_model, checkpoints.open_checkpoint(path), strict=False)
    assert "extra.thing" in caplog.text


def test_unrecognised_and_missing_files_are_explained(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model_state_dict": {"fc.weight": torch.zeros(2)}, "foo": 1}, path)
    with pytest.raises(checkpoints.CheckpointError, match="unrecognised checkpoint"):
        checkpoints.open_checkpoint(path)
    with pytest.raises(checkpoints.CheckpointError, match="checkpoint not found"):
        checkpoints.open_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoints.CheckpointError, match="cannot read checkpoint"):
        checkpoints.open_checkpoint(tmp_path / "garbage.pt")


def test_our_checkpoint_rebuilds_its_model(tmp_path):
    config = ModelConfig(backbone="deit_micro", image_size=(112, 144), local_dim=32, num_kept_nodes=50)
    model = PRGSNetwork(config)
    path = tmp_path / "model.pth"
    checkpoints.save_model(model, path, args={"lr": 1e-3})
    state = torch.load(path, weights_only=True)
    assert state["format"] == checkpoints.CHECKPOINT_FORMAT and state["version"] == checkpoints.CHECKPOINT_VERSION
    assert not any(k.startswith("module.") for k in state["model_state_dict"])
    # the file's config wins over the default
    rebuilt, checkpoint = checkpoints.build_model(ModelConfig(), resume=path)
    assert checkpoint.layout == "prgs" and rebuilt.config == config
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


def test_atomic_save_keeps_the_previous_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    util.atomic_save({"value": torch.tensor(1)}, path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        util.atomic_save({"value": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["value"] == 1
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    util.set_seed(5)
    state = util.rng_states()
    util.atomic_save({"rng": state}, tmp_path / "rng.pth")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    util.set_seed(99)
    util.set_rng_states(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_resolve_device():
    assert util.resolve_device("cpu").type == "cpu"
    assert util.resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            util.resolve_device("cuda")
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        util.resolve_device("tpu")


def test_reference_checkpoints_are_built_at_480x640_and_run_at_resize(full_keys, tmp_path, capsys):
    import parser as prgs_parser

    generator = torch.Generator().manual_seed(5)
    path = tmp_path / "msls_train_prgs.pt"
    torch.save({"model_state_dict": _stand_in(full_keys, "module.", generator)}, path)
    args = prgs_parser.parse_test_args(["--dataset_name", "msls", "--resume", str(path), "--resize", "640", "480"])
    assert args.model_config.image_size == (480, 640) and args.resize == (640, 480)  # portrait input, same regions
    with pytest.raises(SystemExit):
        prgs_parser.parse_test_args(["--dataset_name", "msls", "--resume", str(path), "--resize", "320", "320"])
    assert (
        "gives a 20x20 grid with 129 region nodes, but the model was built for 480x640 (385 regions)"
        in capsys.readouterr().err
    )


def test_one_table_maps_model_flags_to_the_configuration_and_checks_them_against_a_checkpoint():
    trained = ModelConfig(backbone="deit_micro", image_size=(144, 192), local_dim=32, input_norm="per_image")
    args = argparse.Namespace(**dict.fromkeys(MODEL_FLAGS), resume="x.pth")
    fixed = checkpoint_model_flags(args, trained)
    assert set(fixed) == set(MODEL_FLAGS) - {"resize", "local_head_init"} and fixed["local_dim"] == 32
    vars(args).update(fixed, resize=(144, 192), local_head_init="xavier")
    assert model_config_from_args(args, (144, 192)) == dataclasses.replace(trained, local_head_init="xavier")
    args.local_dim = 64
    with pytest.raises(ValueError, match="--local_dim 64 conflicts with the checkpoint x.pth, .* local_dim=32"):
        checkpoint_model_flags(args, trained)
    assert preset_text("resize") == "Preset: 480 640; 144 192 for the toy world"
    assert preset_text("fc_output_dim") == "Preset: 256"
