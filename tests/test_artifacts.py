"""What a model folder is: kinds, adapter -> base, lineage, recorded frame layout (artifacts.py)."""

import json

import pytest

from pokemon_gemma import artifacts
from pokemon_gemma.backends import BackendError, choose_backend


def make(folder, **files):
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / name.replace("__", ".")).write_text(json.dumps(content))
    return folder


def test_kind_of_each_folder(tmp_path):
    folders = {
        "plain": make(tmp_path / "plain", config__json={}),
        "adapter": make(tmp_path / "adapter", adapter_config__json={"base_model_name_or_path": "x"}),
        "merged": make(tmp_path / "merged", config__json={}, merge_manifest__json={}),
        "run": make(tmp_path / "run", config__json={}, run_config__json={}),
        "mlx": make(tmp_path / "mlx", export_manifest__json={}),
        "gguf": make(tmp_path / "gguf", gguf_manifest__json={}),
    }
    kinds = {name: artifacts.folder_kind(f) for name, f in folders.items()}
    assert kinds == {
        "plain": "base",
        "adapter": "adapter",
        "merged": "merged",
        "run": "finetuned",
        "mlx": "mlx",
        "gguf": "gguf",
    }
    assert artifacts.folder_kind(folders["plain"], folders["adapter"]) == "adapter"
    assert artifacts.folder_kind("google/gemma-3-4b-it") == "base"
    with pytest.raises(BackendError, match="is an MLX export"):
        choose_backend(str(folders["mlx"]), "torch")
    assert choose_backend(str(folders["mlx"])) == "mlx" and choose_backend(str(folders["merged"])) == "torch"
    assert choose_backend(str(folders["gguf"])) == "gguf" and choose_backend(str(folders["gguf"]), "gguf") == "gguf"
    for other in ("torch", "mlx"):
        with pytest.raises(BackendError, match="is a GGUF export"):
            choose_backend(str(folders["gguf"]), other)
    with pytest.raises(BackendError, match="is not a GGUF export"):
        choose_backend(str(folders["merged"]), "gguf")


def test_adapter_resolves_to_its_base(tmp_path):
    adapter = make(tmp_path / "run", adapter_config__json={"base_model_name_or_path": "google/gemma-3-4b-it"})
    ref = artifacts.resolve_model(adapter)
    assert (ref.model, ref.adapter, ref.kind) == ("google/gemma-3-4b-it", str(adapter), "adapter")
    explicit = artifacts.resolve_model("base-folder", adapter)
    assert (explicit.model, explicit.adapter) == ("base-folder", str(adapter))
    broken = make(tmp_path / "broken", adapter_config__json={"r": 8})
    with pytest.raises(artifacts.ArtifactError, match=r"broken/adapter_config.json: no base_model_name_or_path"):
        artifacts.resolve_model(broken)


def test_adapter_weights_errors_name_the_file(tmp_path):
    with pytest.raises(artifacts.ArtifactError, match="adapter folder not found"):
        artifacts.adapter_weights(tmp_path / "missing")
    empty = make(tmp_path / "empty", adapter_config__json={})
    with pytest.raises(artifacts.ArtifactError, match=r"empty/adapter_model.safetensors: missing"):
        artifacts.adapter_weights(empty)
    (empty / "adapter_model.safetensors").write_bytes(b"x")
    assert artifacts.adapter_weights(empty).name == "adapter_model.safetensors"


def test_frame_layout_and_run_config_follow_the_lineage(tmp_path):
    """MLX export -> merged folder -> adapter run: what training recorded is found from the export."""
    run = make(
        tmp_path / "run",
        run_config__json={"frame_layout": "grid", "dataset_path": "d.jsonl"},
        adapter_config__json={"base_model_name_or_path": "base-id"},
    )
    best = make(tmp_path / "run" / "best", adapter_config__json={"base_model_name_or_path": "base-id"})
    merged = make(tmp_path / "merged", config__json={}, merge_manifest__json={"adapter": {"path": str(best)}})
    mlx = make(tmp_path / "mlx", export_manifest__json={"source": str(merged)})
    assert artifacts.lineage(mlx) == [mlx, merged, best]
    assert artifacts.run_config_path(best) == run / "run_config.json"  # best/ reads its run's config
    assert artifacts.frame_layout(mlx) == "grid" and artifacts.frame_layout(best) == "grid"
    config, path = artifacts.find_run_config(mlx)
    assert config["dataset_path"] == "d.jsonl" and path == run / "run_config.json"
    assert artifacts.find_base_model(mlx) == "base-id"
    plain = make(tmp_path / "plain", config__json={})
    assert artifacts.frame_layout(plain) is None and artifacts.frame_layout(None, plain) is None
    (plain / "run_config.json").write_text('{"frame_layout": "diagonal"}')  # not a layout: ignored
    assert artifacts.frame_layout(plain) is None
