"""Merge a LoRA adapter trained a few steps on the tiny model, then export it to MLX (real mlx[cpu],
real mlx-vlm converter, nothing mocked) and compare with PyTorch."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("mlx_vlm")

from pokemon_gemma import artifacts, fileio  # noqa: E402
from pokemon_gemma.cli import export_mlx as convert_to_mlx  # noqa: E402
from pokemon_gemma.cli import merge as merge_qlora  # noqa: E402
from pokemon_gemma.collate import Collator  # noqa: E402
from pokemon_gemma.dataset import BUTTONS  # noqa: E402
from pokemon_gemma.export import common, mlx, mlx_fixes  # noqa: E402
from pokemon_gemma.families import get_family  # noqa: E402
from pokemon_gemma.modeling import apply_lora, load_for_inference, load_model, load_processor  # noqa: E402


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny Gemma 3 with hidden size 128 (sqrt(128) is not a bfloat16 number, like gemma-3-4b's
    sqrt(2560)), a `tokenizer.model` (real Gemma folders have one; merges must keep it), and
    gemma-3-4b's linear x8 RoPE scaling on the global layers (the MLX export must keep it)."""
    from pokemon_gemma.tiny import build_tiny_model

    base = build_tiny_model(tmp_path_factory.mktemp("export") / "base", seed=0, hidden_size=128)
    (base / "tokenizer.model").write_bytes(b"sentencepiece model bytes\x00\x01")
    config = json.loads((base / "config.json").read_text())
    config["text_config"]["rope_parameters"]["full_attention"] = {
        "rope_type": "linear",
        "factor": 8.0,
        "rope_theta": 1000000.0,
    }
    (base / "config.json").write_text(json.dumps(config, indent=2))
    return base


@pytest.fixture(scope="module")
def adapter_dir(base_dir) -> Path:
    """A LoRA adapter trained 4 AdamW steps on fixed demo samples (lora_B starts at zero, so the
    steps are what makes the merge change the model)."""
    torch.manual_seed(0)
    model = apply_lora(load_model(str(base_dir)), r=4, alpha=8, dropout=0.0)
    collator = Collator(load_processor(str(base_dir)), max_seq_length=4096)
    samples = common.fixed_samples(2)
    batch = collator.pad([collator.encode(s.record, images=s.frames) for s in samples])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(4):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = base_dir.parent / "adapter"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def merged_dir(base_dir, adapter_dir) -> Path:
    out = base_dir.parent / "merged"
    rc = merge_qlora.main(
        [
            "--base_model",
            str(base_dir),
            "--lora_path",
            str(adapter_dir),
            "--output_path",
            str(out),
            "--dtype",
            "fp32",
            "--verify_samples",
            "2",
        ]
    )
    assert rc == 0
    return out


def _error(captured) -> str:
    """The one error line of a CLI run (log lines also go to stderr); no traceback."""
    err = captured.err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _logits(model, collator, sample, token_type_ids=True):
    return common.torch_logits(model, collator, sample, token_type_ids=token_type_ids)


@pytest.mark.slow  # trains an adapter and merges
def test_merge_equals_adapter_and_writes_manifest(base_dir, adapter_dir, merged_dir):
    manifest = json.loads((merged_dir / artifacts.MERGE_MANIFEST).read_text())
    assert manifest["base_model"] == str(base_dir)
    assert manifest["adapter"]["sha256"] == fileio.file_sha256(adapter_dir / "adapter_model.safetensors")
    assert manifest["dtype"] == "fp32" and manifest["versions"]["peft"] and manifest["created"]
    assert manifest["verification"]["passed"] and manifest["verification"]["max_abs_logit_diff"] < 1e-4
    assert manifest["verification"]["adapter_effect"] > 1e-2  # the trained adapter does move the base
    assert manifest["frame_layout"] is None and manifest["adapter_trained_with_qlora"] is None  # no run_config.json
    assert manifest["tensors_renamed_to_hub_names"] == 0  # the base has the hub's names, so does the merge
    # every tokenizer file of the base, tokenizer.model included (byte for byte)
    assert (merged_dir / "tokenizer.model").read_bytes() == (base_dir / "tokenizer.model").read_bytes()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"):
        assert (merged_dir / name).is_file(), name

    # independently of the manifest: merged == base + adapter, and the adapter does change the model
    processor = load_processor(str(merged_dir))
    collator = Collator(processor, max_seq_length=4096)
    sample = common.fixed_samples(3)[2]
    adapter_model, _ = load_for_inference(str(base_dir), str(adapter_dir), device="cpu")
    merged = load_model(str(merged_dir)).eval()
    base = load_model(str(base_dir)).eval()
    with_adapter = _logits(adapter_model, collator, sample)[0]
    got = _logits(merged, collator, sample)[0]
    assert float((got - with_adapter).abs().max()) < 1e-4
    assert float((_logits(base, collator, sample)[0] - got).abs().max()) > 1e-2


@pytest.mark.slow  # merges
def test_merge_errors_are_one_line(base_dir, adapter_dir, merged_dir, tmp_path, capsys):
    # output exists without --overwrite: usage error
    rc = merge_qlora.main(
        [
            "--base_model",
            str(base_dir),
            "--lora_path",
            str(adapter_dir),
            "--output_path",
            str(merged_dir),
            "--no-verify",
        ]
    )
    err = _error(capsys.readouterr())
    assert rc == 2 and "output folder exists" in err and "--overwrite" in err

    # missing adapter weights
    broken = tmp_path / "broken_adapter"
    shutil.copytree(adapter_dir, broken)
    (broken / "adapter_model.safetensors").unlink()
    rc = merge_qlora.main(
        ["--base_model", str(base_dir), "--lora_path", str(broken), "--output_path", str(tmp_path / "out1")]
    )
    err = _error(capsys.readouterr())
    assert rc == 2 and f"{broken}/adapter_model.safetensors: missing" in err
    assert not (tmp_path / "out1").exists()

    # an adapter made for another model size (lora_A of the wrong width)
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other_adapter"
    shutil.copytree(adapter_dir, other)
    tensors = load_file(other / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] * 2)
    save_file(tensors, other / "adapter_model.safetensors")
    rc = merge_qlora.main(
        ["--base_model", str(base_dir), "--lora_path", str(other), "--output_path", str(tmp_path / "out2")]
    )
    err = _error(capsys.readouterr())
    assert rc == 1 and err.startswith("error: adapter/base mismatch") and "size mismatch" in err
    assert not (tmp_path / "out2").exists() and not list(tmp_path.glob(".out2*"))

    with pytest.raises(common.ExportError, match="not enough disk"):
        common.check_free_disk(tmp_path, 10**18)


def test_flat_folder_gets_hub_names_in_the_mlx_staging_copy(merged_dir, tmp_path):
    """The safety net for folders saved flat (an older tiny builder): renamed in the copy only."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    flat = tmp_path / "flat"
    shutil.copytree(merged_dir, flat)
    for shard in flat.glob("*.safetensors"):
        tensors = load_file(shard)
        save_file({k.replace("vision_tower.vision_model.", "vision_tower."): v for k, v in tensors.items()}, shard)
    work = tmp_path / "work"
    work.mkdir()
    fixes = mlx_fixes.prepare_mlx_source(flat, work)
    assert "fix_vision_tower_prefix" in {f["fix"] for f in fixes}
    with safe_open(next(work.glob("*.safetensors")), "pt") as fh:
        assert all(not k.startswith("vision_tower.") or k.startswith("vision_tower.vision_model.") for k in fh.keys())
    with safe_open(next(flat.glob("*.safetensors")), "pt") as fh:  # the source is untouched
        assert any(k.startswith("vision_tower.embeddings.") for k in fh.keys())


def test_config_fixes_are_noops_when_not_needed():
    config = {
        "model_type": "gemma3",
        "mm_tokens_per_image": 256,
        "text_config": {
            "hidden_size": 2560,
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        },
    }
    applied = mlx_fixes.apply_config_fixes(config)
    assert [f["fix"] for f in applied] == [
        "fix_mm_tokens_in_text_config",
        "fix_top_level_hidden_size",
        "fix_rope_parameters",
    ]
    text = config["text_config"]
    assert text["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    assert text["rope_local_base_freq"] == 10000.0 and text["rope_global_base_freq"] == 1000000.0
    assert config["hidden_size"] == 2560 and text["mm_tokens_per_image"] == 256
    assert mlx_fixes.apply_config_fixes(config) == []


@pytest.fixture(scope="module")
def mlx_fp32_dir(merged_dir) -> Path:
    # A transformers-5 folder without a top-level hidden_size (mlx-vlm would assume 2048).
    source = merged_dir.parent / "merged_no_hidden"
    shutil.copytree(merged_dir, source)
    config = json.loads((source / "config.json").read_text())
    config.pop("hidden_size", None)
    (source / "config.json").write_text(json.dumps(config, indent=2))
    out = merged_dir.parent / "mlx_fp32"
    rc = convert_to_mlx.main(
        [
            "--model_path",
            str(source),
            "--output_path",
            str(out),
            "--quantization_bits",
            "none",
            "--verify_samples",
            "6",
            "--logit_samples",
            "2",
        ]
    )
    assert rc == 0
    return out


@pytest.mark.slow  # exports
def test_fp32_export_matches_pytorch(mlx_fp32_dir, merged_dir):
    manifest = json.loads((mlx_fp32_dir / artifacts.MLX_MANIFEST).read_text())
    applied = {f["fix"] for f in manifest["fixes_applied"]}
    # the merged folder has the hub's weight names: only the config fixes are needed
    assert applied == {"fix_mm_tokens_in_text_config", "fix_top_level_hidden_size", "fix_rope_parameters"}
    assert set(get_family("gemma3").mlx_fixes) == applied | {"fix_vision_tower_prefix"}
    config = json.loads((mlx_fp32_dir / "config.json").read_text())
    assert config["hidden_size"] == 128 and config["text_config"]["mm_tokens_per_image"] == 16
    assert config["text_config"]["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    assert manifest["quantization"] is None and manifest["dtype"] == "float32"
    # the converter does not carry tokenizer.model over; the export does
    assert (mlx_fp32_dir / "tokenizer.model").read_bytes() == (merged_dir / "tokenizer.model").read_bytes()
    assert "tokenizer.model" in manifest["tokenizer_files_copied_from_source"]
    assert manifest["versions"]["mlx-vlm"] and manifest["versions"]["transformers"]
    v = manifest["verification"]
    assert v["passed"] and v["logits"]["max_abs_diff"] <= 1e-3
    # mlx-vlm's bf16 embedding normaliser is reproduced in the reference, and its effect reported
    assert v["logits"]["embed_scale"] == {"exact": pytest.approx(128**0.5), "mlx_vlm_bf16": 11.3125}
    assert v["logits"]["max_abs_diff_vs_exact_pytorch"] > v["logits"]["max_abs_diff"]
    assert v["buttons"]["agreement_vs_pytorch_causal"] == 1.0
    assert 0.0 <= v["buttons"]["agreement_vs_pytorch_with_token_type_ids"] <= 1.0

    # independently of the manifest: the export itself, loaded by mlx_vlm.load, vs PyTorch (no token_type_ids)
    from pokemon_gemma.backends.mlx_backend import MlxButtonScorer, import_mlx_vlm

    mlx_vlm = import_mlx_vlm()
    model, _ = mlx_vlm.load(str(mlx_fp32_dir))
    assert hasattr(model, "vision_tower") and hasattr(model, "multi_modal_projector")
    scorer = MlxButtonScorer(mlx_fp32_dir)
    collator = Collator(load_processor(str(merged_dir)), max_seq_length=4096)
    pt = load_model(str(merged_dir)).eval()
    sample = common.fixed_samples(4)[3]
    with mlx.MlxNormaliser(pt):
        ref, enc = _logits(pt, collator, sample, token_type_ids=False)
    got = scorer.logits(enc.input_ids.numpy(), images=collator.images_for([], sample.frames))
    assert got.shape == tuple(ref.shape)
    assert float(np.abs(got - ref.numpy()).max()) <= 1e-3
    from pokemon_gemma.scoring import ButtonScorer

    r = sample.record
    mlx_scores = scorer.score(sample.frames, r.context, r.question).logprobs
    with mlx.MlxNormaliser(pt):
        pt_scores = ButtonScorer(pt, collator, causal_images=True).score(sample.frames, r.context, r.question).logprobs
    assert max(abs(mlx_scores[b] - pt_scores[b]) for b in pt_scores) < 1e-3


@pytest.mark.slow  # exports
def test_importing_mlx_backend_keeps_transformers_processor(mlx_fp32_dir, base_dir):
    from transformers import AutoProcessor

    from pokemon_gemma.backends.mlx_backend import import_mlx_vlm

    import_mlx_vlm()
    processor = AutoProcessor.from_pretrained(str(base_dir))
    assert type(processor).__module__.startswith("transformers."), type(processor).__module__
    assert "token_type_ids" in processor(
        text=["<start_of_image>"], images=[[common.fixed_samples(1)[0].frames[0]]], return_tensors="pt"
    )


@pytest.mark.slow  # exports
def test_4bit_export_generates_and_its_reported_agreement_is_recomputed(base_dir, merged_dir, mlx_fp32_dir, capsys):
    out = merged_dir.parent / "mlx_4bit"
    rc = convert_to_mlx.main(
        [
            "--model_path",
            str(merged_dir),
            "--output_path",
            str(out),
            "--quantization_bits",
            "4",
            "--verify_samples",
            "8",
            "--logit_samples",
            "1",
        ]
    )
    captured = capsys.readouterr()
    manifest = json.loads((out / artifacts.MLX_MANIFEST).read_text())
    buttons = manifest["verification"]["buttons"]
    assert manifest["quantization"] == {"bits": 4, "group_size": 64}
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    assert "vs PyTorch with token_type_ids" in captured.out
    assert manifest["verification"]["logits"]["max_abs_diff"] <= 1e-3  # the unquantised fixed weights
    # a refusal's one error line names the figure (k/n vs the 90% required) and the remedy
    assert buttons["agreed"] == round(buttons["agreement_vs_pytorch_causal"] * 8)
    forced = json.loads(json.dumps(manifest["verification"]))
    forced["passed"] = forced["buttons"]["passed"] = False
    reason = mlx.refusal(forced, 4, out)
    assert f"MLX export (4-bit) failed verification: its buttons agree with PyTorch on {buttons['agreed']}/8 " in reason
    assert "required 90%" in reason and "--quantization_bits 8 or none" in reason and "--no-verify" in reason
    if rc == 1:
        assert reason in captured.err

    from pokemon_gemma.backends.mlx_backend import MlxButtonScorer, import_mlx_vlm
    from pokemon_gemma.scoring import ButtonScorer

    # Independently of the manifest: the 4-bit export's button vs PyTorch's (causal inside images, as
    # in MLX) on the same 8 fixed samples; the reported agreement and the exit code must follow it.
    scorer = MlxButtonScorer(out)
    collator = Collator(load_processor(str(merged_dir)), max_seq_length=4096)
    pt = ButtonScorer(load_model(str(merged_dir)).eval(), collator, causal_images=True)
    samples = common.fixed_samples(8)
    quantised = [scorer.score(s.frames, s.record.context, s.record.question) for s in samples]
    reference = [pt.score(s.frames, s.record.context, s.record.question) for s in samples]
    agreement = sum(q.button == r.button for q, r in zip(quantised, reference)) / len(samples)
    assert buttons["samples"] == 8 and buttons["agreement_vs_pytorch_causal"] == agreement
    assert rc == (0 if agreement >= 0.9 else 1)
    assert (rc == 1) == ("failed verification" in captured.err)
    # 4 bits for real: the scores move away from the float export's, though not far
    exact = MlxButtonScorer(mlx_fp32_dir)
    s = samples[0]
    got, want = quantised[0].logprobs, exact.score(s.frames, s.record.context, s.record.question).logprobs
    assert 1e-3 < max(abs(got[b] - want[b]) for b in BUTTONS) < 5.0

    # The gate can fail: judged against another model (the base picks "down" on these samples where the
    # merged model picks "up"), the same export agrees on no sample and fails verification.
    other = mlx.verify_mlx(base_dir, mlx_fp32_dir, out, samples[:4], n_logit_samples=1, quantized=True)
    assert {r.button for r in reference} == {"up"}
    assert other["buttons"]["agreement_vs_pytorch_causal"] == 0.0
    assert other["buttons"]["passed"] is False and other["passed"] is False

    model, _ = import_mlx_vlm().load(str(out))
    assert model.language_model.model.layers[0].mlp.up_proj.bits == 4
    ids = scorer.generate_ids(s.frames, s.record.context, s.record.question, max_new_tokens=6)
    assert 1 <= len(ids) <= 6 and all(isinstance(i, int) for i in ids)


@pytest.mark.slow  # exports
def test_export_errors_are_one_line(adapter_dir, mlx_fp32_dir, merged_dir, tmp_path, capsys):
    rc = convert_to_mlx.main(["--model_path", str(merged_dir), "--output_path", str(mlx_fp32_dir)])
    err = _error(capsys.readouterr())
    assert rc == 2 and "output folder exists" in err
    rc = convert_to_mlx.main(["--model_path", str(adapter_dir), "--output_path", str(tmp_path / "x")])
    err = _error(capsys.readouterr())
    assert rc == 2 and "merge it first" in err
    rc = convert_to_mlx.main(["--model_path", str(tmp_path), "--output_path", str(tmp_path / "y")])
    err = _error(capsys.readouterr())
    assert rc == 2 and "config.json: missing" in err


@pytest.mark.slow  # exports in a subprocess
def test_an_export_killed_midway_leaves_nothing_after_the_next_export(merged_dir, tmp_path):
    """SIGKILL during an MLX export leaves its staging folder and source copy behind (a full model copy
    each); the next export into the same place removes them."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "mlx"
    cmd = [sys.executable, str(REPO / "scripts" / "convert_to_mlx.py"), "--model_path", str(merged_dir)]
    cmd += ["--output_path", str(out), "--quantization_bits", "none", "--verify_samples", "2", "--logit_samples", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    leftovers = lambda: sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".mlx."))  # noqa: E731
    try:
        deadline = time.time() + 300
        while not any("mlx-src" in name for name in leftovers()) and time.time() < deadline:
            assert proc.poll() is None, "the export ended before it could be killed"
            time.sleep(0.05)
        time.sleep(0.5)  # copying the source model
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = leftovers()
    assert any(f"mlx-src-{proc.pid}" == name.rsplit(".", 1)[-1] for name in killed), killed
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert leftovers() == [] and (out / "export_manifest.json").is_file()
