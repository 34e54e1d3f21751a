"""Merged folders with the hub's weight names, and the GGUF export: llama.cpp's own converter (from the
pinned llama-cpp-python sdist, extracted by ./init.sh --gguf) and the GGUF backend (real
llama-cpp-python) against PyTorch on a tiny Gemma 3 with a trained LoRA adapter merged in. Nothing
mocked."""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pokemon_gemma import artifacts, fileio, hub_names
from pokemon_gemma.backends import BackendError, choose_backend, load_backend
from pokemon_gemma.cli import export_gguf as convert_to_gguf
from pokemon_gemma.cli import merge as merge_qlora
from pokemon_gemma.collate import Collator
from pokemon_gemma.dataset import BUTTONS
from pokemon_gemma.export import common, gguf, llama_cpp
from pokemon_gemma.modeling import apply_lora, load_model, load_processor
from pokemon_gemma.scoring import ButtonScorer
from tests.helpers import write_dataset

# test.sh installs llama-cpp-python (./init.sh --dev --gguf) and sets this: there a missing GGUF
# stack is a failure, not a skip.
if os.environ.get("POKEMON_GEMMA_REQUIRE_GGUF") != "1":
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (./init.sh --gguf)")
    try:
        llama_cpp.find_converter()
    except common.ExportError as exc:
        pytest.skip(str(exc), allow_module_level=True)


def _error(captured) -> str:
    err = captured.err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    keys = []
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as fh:
            keys += list(fh.keys())
    return keys


def _flat_copy(folder: Path, dest: Path) -> Path:
    """A copy of a hub-named folder with transformers 5's flat SigLIP names (what the tiny builder
    wrote before it saved hub names)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, dest)
    for shard in dest.glob("*.safetensors"):
        tensors = load_file(shard)
        flat = {k.replace(hub_names.HUB_VISION, hub_names.FLAT_VISION): v for k, v in tensors.items()}
        save_file(flat, shard, metadata={"format": "pt"})
    assert hub_names.flat_keys(dest) > 0
    return dest


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    from pokemon_gemma.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("gguf") / "base", seed=0)


@pytest.fixture(scope="module")
def adapter_dir(base_dir) -> Path:
    """LoRA (language + vision) trained 6 AdamW steps on fixed demo samples."""
    torch.manual_seed(0)
    model = apply_lora(load_model(str(base_dir)), r=4, alpha=8, dropout=0.0, targets="language+vision")
    collator = Collator(load_processor(str(base_dir)), max_seq_length=4096)
    samples = common.fixed_samples(4)
    batch = collator.pad([collator.encode(s.record, images=s.frames) for s in samples])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for _ in range(6):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = base_dir.parent / "adapter"
    model.save_pretrained(out)
    return out


def _merge(base: Path, adapter: Path, out: Path) -> Path:
    rc = merge_qlora.main(
        ["--base_model", str(base), "--lora_path", str(adapter), "--output_path", str(out), "--dtype", "fp32"]
        + ["--verify_samples", "1"]
    )
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def merged_dir(base_dir, adapter_dir) -> Path:
    return _merge(base_dir, adapter_dir, base_dir.parent / "merged")


def _export(merged: Path, out: Path, quantization: str, *extra: str) -> tuple[int, dict]:
    rc = convert_to_gguf.main(
        ["--model_path", str(merged), "--output_dir", str(out), "--quantization", quantization, *extra]
    )
    manifest = (
        json.loads((out / artifacts.GGUF_MANIFEST).read_text()) if (out / artifacts.GGUF_MANIFEST).is_file() else {}
    )
    return rc, manifest


@pytest.fixture(scope="module")
def gguf_f32(merged_dir) -> Path:
    out = merged_dir.parent / "gguf_f32"
    rc, _ = _export(merged_dir, out, "f32", "--verify_samples", "6", "--logit_samples", "2")
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def gguf_q8(merged_dir) -> Path:
    out = merged_dir.parent / "gguf_q8_0"
    rc, _ = _export(merged_dir, out, "q8_0", "--verify_samples", "32", "--logit_samples", "1")
    assert rc == 0
    return out


@pytest.mark.slow  # merges, exports with llama.cpp's converter, scores with llama.cpp
def test_tiny_and_merged_folders_use_the_hub_names(base_dir, adapter_dir, merged_dir, tmp_path):
    for folder in (base_dir, merged_dir):
        keys = _keys(folder)
        assert hub_names.flat_keys(folder) == 0
        assert any(k.startswith("vision_tower.vision_model.encoder.layers.") for k in keys)
        assert any(k.startswith("language_model.model.layers.") for k in keys)
        assert any(k.startswith("multi_modal_projector.") for k in keys)
    manifest = json.loads((merged_dir / artifacts.MERGE_MANIFEST).read_text())
    assert manifest["tensors_renamed_to_hub_names"] == 0  # transformers kept the base's names
    # The tiny tokenizer prepends <bos> like Gemma's when asked to (the project never asks).
    tokenizer = load_processor(str(base_dir)).tokenizer
    assert tokenizer("up")["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer.bos_token_id not in tokenizer("up", add_special_tokens=False)["input_ids"]

    # An older, flat base: the merge still writes hub names, and the merged model is the same model.
    flat_base = _flat_copy(base_dir, tmp_path / "flat_base")
    from_flat = _merge(flat_base, adapter_dir, tmp_path / "merged_from_flat")
    assert hub_names.flat_keys(from_flat) == 0
    assert json.loads((from_flat / artifacts.MERGE_MANIFEST).read_text())["tensors_renamed_to_hub_names"] > 0
    a, b = load_model(str(merged_dir)).state_dict(), load_model(str(from_flat)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _vendored_gguf_reader():
    """gguf-py as vendored by the same llama.cpp (PyPI's gguf is older than the files it wrote)."""
    sys.path.insert(0, str(llama_cpp.find_converter() / "gguf-py"))
    try:
        import gguf as gguf_py
    finally:
        sys.path.pop(0)
    return gguf_py.GGUFReader


def _field(reader, key):
    field = reader.fields[key]
    value = field.parts[field.data[0]]
    return bytes(value).decode() if value.dtype == np.uint8 else value.tolist()[0]


@pytest.mark.slow  # merges, exports with llama.cpp's converter, scores with llama.cpp
def test_f32_export_matches_pytorch(gguf_f32, merged_dir):
    manifest = json.loads((gguf_f32 / artifacts.GGUF_MANIFEST).read_text())
    assert manifest["fixes_applied"] == [] and not manifest["source_had_flat_weight_names"]
    for role, prefix in (("text", "model"), ("mmproj", "mmproj")):
        entry = manifest["files"][role]
        assert entry["name"] == f"{prefix}-f32.gguf"
        assert entry["bytes"] == (gguf_f32 / entry["name"]).stat().st_size > 0
        assert entry["sha256"] == fileio.file_sha256(gguf_f32 / entry["name"])
    # Everything published is readable like an ordinary file (the converter and safetensors write their own).
    assert all(p.stat().st_mode & 0o777 == fileio.FILE_MODE for p in gguf_f32.iterdir() if p.is_file())
    conv = manifest["converter"]
    assert conv["llama_cpp_python"] == llama_cpp.LLAMA_CPP_PYTHON_VERSION and len(conv["llama_cpp_commit"]) == 40
    assert conv["gguf_py_version"] and manifest["versions"]["llama-cpp-python"] == llama_cpp.LLAMA_CPP_PYTHON_VERSION
    v = manifest["verification"]
    assert v["passed"] and v["non_causal_images"] and v["logits"]["gated"]
    assert v["logits"]["max_abs_diff"] <= gguf.GGUF_F32_TOLERANCE * max(1.0, v["logits"]["max_abs_logit"])
    assert v["logits"]["image_features_max_abs_diff"] < 1e-2
    assert v["buttons"]["agreed"] == v["buttons"]["samples"] == 6

    # What llama.cpp's converter wrote, read with its own gguf-py.
    reader = _vendored_gguf_reader()
    text = reader(str(gguf_f32 / "model-f32.gguf"))
    assert _field(text, "general.architecture") == "gemma3" and _field(text, "tokenizer.ggml.add_bos_token") is True
    mmproj = reader(str(gguf_f32 / "mmproj-f32.gguf"))
    assert _field(mmproj, "clip.projector_type") == "gemma3" and _field(mmproj, "clip.vision.image_size") == 64

    # Independently of the manifest: the backend's scores vs PyTorch with token_type_ids, and the
    # per-frame feature path (the server's frame cache) vs the plain one.
    from pokemon_gemma.backends.gguf_backend import GgufButtonScorer

    scorer = GgufButtonScorer(gguf_f32)
    try:
        pt = ButtonScorer(load_model(str(merged_dir)).eval(), Collator(load_processor(str(merged_dir))))
        sample = common.fixed_samples(9)[8]
        r = sample.record
        got = scorer.score(sample.frames, r.context, r.question).logprobs
        ref = pt.score(sample.frames, r.context, r.question).logprobs
        assert max(abs(got[b] - ref[b]) for b in BUTTONS) < 0.05
        # Each score is log P(full answer | prompt): one full llama.cpp pass per answer, no shared prefix
        # and no rollback, gives the same numbers.
        from pokemon_gemma.scoring import _common_prefix_length, answer_prefix, answer_start

        collator = scorer.collator
        prompt = collator.prompt_text(r.context, r.question)
        full = [collator.expanded_ids(prompt + answer_prefix(b)) for b in BUTTONS]
        start = answer_start(collator, prompt, full, _common_prefix_length(full))
        for b, ids in zip(BUTTONS, full):
            rows = torch.log_softmax(torch.from_numpy(scorer.logits(ids, sample.frames)[start - 1 : -1]).double(), -1)
            assert abs(sum(float(rows[j, t]) for j, t in enumerate(ids[start:])) - got[b]) < 1e-3
        features = scorer.image_features(scorer.collator.images_for([], sample.frames))
        assert features.shape == (4, 16, 64)
        cached = scorer.score(sample.frames, r.context, r.question, features=features).logprobs
        assert all(cached[b] == got[b] for b in BUTTONS)
        ids = scorer.generate_ids(sample.frames, r.context, r.question, max_new_tokens=5)
        assert 1 <= len(ids) <= 5
    finally:
        scorer.close()


@pytest.mark.slow  # merges, exports with llama.cpp's converter, scores with llama.cpp
def test_q8_export_agrees_and_every_stage_takes_it(gguf_q8, gguf_f32, merged_dir, tmp_path):
    manifest = json.loads((gguf_q8 / artifacts.GGUF_MANIFEST).read_text())
    bt = manifest["verification"]["buttons"]
    assert manifest["verification"]["passed"] and not manifest["verification"]["logits"]["gated"]
    assert bt["samples"] == 32 and bt["agreed"] / 32 >= gguf.MIN_BUTTON_AGREEMENT == 0.9
    assert bt["required_agreement"] == 0.9
    f32_bytes = json.loads((gguf_f32 / artifacts.GGUF_MANIFEST).read_text())["files"]["text"]["bytes"]
    assert manifest["files"]["text"]["bytes"] < 0.4 * f32_bytes
    # The side-by-side table (demo.sh, README) reads the same figures from the manifests.
    from pokemon_gemma.export import compare

    rows = compare.table([gguf_q8, gguf_f32, merged_dir]).splitlines()
    assert "| GGUF q8_0 |" in rows[2] and f"| {bt['agreed']}/32 (" in rows[2] and "| passed |" in rows[2]
    assert "| GGUF f32 |" in rows[3] and "| 6/6 (100.0%) |" in rows[3]
    assert "no export manifest" in rows[4]

    # The backend layer picks llama.cpp for a GGUF folder, and only for one.
    assert artifacts.folder_kind(gguf_q8) == "gguf" and choose_backend(str(gguf_q8)) == "gguf"
    with pytest.raises(BackendError, match="is a GGUF export"):
        choose_backend(str(gguf_q8), "torch")
    with pytest.raises(BackendError, match="is not a GGUF export"):
        choose_backend(str(merged_dir), "gguf")
    with pytest.raises(BackendError, match="adapter cannot be put on a GGUF export"):
        load_backend(str(gguf_q8), str(merged_dir))
    backend = load_backend(str(gguf_q8))
    assert backend.name == "gguf" and backend.kind == "gguf" and backend.supports_features
    assert backend.model_version.startswith("gguf_q8_0-")
    sample = common.fixed_samples(1)[0]
    text = backend.generate(sample.frames, sample.record.context, sample.record.question, max_new_tokens=8)
    assert isinstance(text, str)
    backend.scorer.close()

    # evaluate.py on the f32 export picks exactly the merged PyTorch model's buttons.
    from pokemon_gemma.cli import evaluate

    data = write_dataset(tmp_path / "data", 6, name="test.jsonl")
    preds = {}
    for name, folder in (("gguf", gguf_f32), ("torch", merged_dir)):
        rc = evaluate.main(
            ["--model_name", str(folder), "--dataset_path", str(data), "--output_dir", str(tmp_path / name)]
            + ["--no_progress"]
        )
        assert rc == 0
        report = json.loads((tmp_path / name / "eval_report.json").read_text())
        assert report["model_kind"] == ("gguf" if name == "gguf" else "merged")
        rows = (tmp_path / name / "predictions.jsonl").read_text().splitlines()
        preds[name] = [json.loads(row)["predicted"] for row in rows]
    assert preds["gguf"] == preds["torch"]


@pytest.mark.slow  # merges, exports with llama.cpp's converter, scores with llama.cpp
def test_gguf_server(gguf_q8, tmp_path):
    """scripts/inference_server.py on a GGUF folder: llama.cpp chosen by the folder, frame cache on."""
    import math

    from pokemon_gemma.serve.client import predict_payload, synthetic_stream
    from pokemon_gemma.serve.launch import ServerProcess
    from tests.test_serve import assert_valid_prediction, client

    frames = synthetic_stream(7)
    with (
        ServerProcess(["--model_path", str(gguf_q8)], log_path=tmp_path / "gguf.log", cwd=tmp_path) as srv,
        client(srv.url) as c,
    ):
        assert c.get("/ready").json()["backend"] == "gguf"
        stream = [
            c.post("/v1/predict", json=predict_payload(frames[i : i + 4], session_id="g")).json() for i in range(3)
        ]
        for body in stream:
            assert_valid_prediction(body, version_prefix="gguf_q8_0-")
        assert [r["cache"]["hits"] for r in stream] == [0, 3, 3]
        fresh = c.post("/v1/predict", json=predict_payload(frames[2:6])).json()
        assert all(
            math.isclose(stream[2]["probabilities"][b], fresh["probabilities"][b], abs_tol=1e-6) for b in BUTTONS
        )
        body = c.post("/v1/predict", json={**predict_payload(frames[:4]), "mode": "generate"}).json()
        assert "raw" in body
    assert "Traceback" not in srv.log()


@pytest.mark.slow  # merges, exports with llama.cpp's converter, scores with llama.cpp
def test_flat_folder_gets_hub_names_in_the_staging_copy(merged_dir, tmp_path):
    flat = _flat_copy(merged_dir, tmp_path / "flat")
    before = {p.name: fileio.file_sha256(p) for p in flat.iterdir() if p.is_file()}
    rc, manifest = _export(flat, tmp_path / "out", "f16", "--no-verify")
    assert rc == 0 and manifest["verification"] == {"ran": False}
    assert manifest["source_had_flat_weight_names"]
    assert [f["fix"] for f in manifest["fixes_applied"]] == ["hub_weight_names"]
    assert before == {p.name: fileio.file_sha256(p) for p in flat.iterdir() if p.is_file()}  # source untouched
    assert sorted(p.name for p in (tmp_path / "out").glob("*.gguf")) == ["mmproj-f16.gguf", "model-f16.gguf"]


@pytest.mark.slow  # merges, exports with llama.cpp's converter, scores with llama.cpp
def test_refused_export_names_the_figure_and_the_remedy(merged_dir, tmp_path, monkeypatch, capsys):
    # A bar no export can reach: the refusal path end to end (real conversion and scoring).
    monkeypatch.setattr(gguf, "MIN_BUTTON_AGREEMENT", 1.01)
    rc, manifest = _export(merged_dir, tmp_path / "out", "q8_0", "--verify_samples", "4", "--logit_samples", "1")
    err = _error(capsys.readouterr())
    agreed = manifest["verification"]["buttons"]["agreed"]
    assert rc == 1 and not manifest["verification"]["passed"]
    assert re.search(rf"GGUF export \(q8_0\) failed verification: its buttons agree with PyTorch on {agreed}/4 ", err)
    assert "below the required 101%" in err and "--quantization f16 or f32" in err and "--no-verify" in err
    assert f"{tmp_path / 'out' / artifacts.GGUF_MANIFEST}" in err


@pytest.mark.slow  # merges, exports with llama.cpp's converter, scores with llama.cpp
def test_errors_are_one_line(merged_dir, adapter_dir, gguf_f32, tmp_path, capsys):
    rc, _ = _export(merged_dir, gguf_f32, "f32")
    err = _error(capsys.readouterr())
    assert rc == 2 and "output folder exists" in err and "--overwrite" in err
    rc, _ = _export(adapter_dir, tmp_path / "a", "f16")
    err = _error(capsys.readouterr())
    assert rc == 2 and "merge it first" in err
    rc, _ = _export(merged_dir, tmp_path / "b", "f16", "--llama_cpp_dir", str(tmp_path / "nowhere"))
    err = _error(capsys.readouterr())
    assert rc == 2 and "llama.cpp's converter not found" in err and "./init.sh --gguf" in err
    assert not (tmp_path / "b").exists()


def test_converter_is_the_pinned_sdists():
    import llama_cpp as llama_cpp_python

    folder = llama_cpp.find_converter()
    info = llama_cpp.converter_info(folder)
    assert llama_cpp_python.__version__ == llama_cpp.LLAMA_CPP_PYTHON_VERSION
    if os.environ.get(llama_cpp.CONVERTER_ENV) is None:  # the one ./init.sh --gguf extracted
        assert info["llama_cpp_python"] == llama_cpp.LLAMA_CPP_PYTHON_VERSION and len(info["sdist_sha256"]) == 64
        assert llama_cpp.fetch_converter(folder) == (folder, False)  # idempotent: nothing downloaded
    # init.sh installs requirements-gguf.txt, whose pin is the converter's
    root = Path(__file__).resolve().parent.parent
    assert "-r requirements-gguf.txt" in (root / "init.sh").read_text()
    pins = (root / "requirements-gguf.txt").read_text().splitlines()
    assert f"llama-cpp-python=={llama_cpp.LLAMA_CPP_PYTHON_VERSION}" in pins
