"""Model families behind one interface: QLoRA keeps the vision side unquantised, the family comes from
the config, and Gemma 4's prompt, labels and vision inputs are exactly what its processor makes."""

import collections
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from pokemon_gemma.collate import IGNORE_INDEX, Collator
from pokemon_gemma.dataset import load_records
from pokemon_gemma.families import FamilyError, family_of, get_family
from pokemon_gemma.modeling import ModelLoadError, apply_lora, load_model, load_processor
from pokemon_gemma.pipeline.stages import STAGES
from tests.conftest import REPO_ROOT
from tests.helpers import write_dataset


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return load_records(write_dataset(tmp_path_factory.mktemp("family_data"), 4, seed=0))


def linear_kinds(model) -> collections.Counter:
    kinds = collections.Counter()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            part = ".".join(name.split(".")[:2]) if name.startswith("model.") else name
            kinds[(part, type(module).__name__)] += 1
    return kinds


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_gemma4_dir"])
def test_qlora_quantises_only_the_language_model(fixture, request):
    # A bare "vision_tower" skip name matched nothing: the vision tower was quantised too.
    model = load_model(str(request.getfixturevalue(fixture)), qlora=True)
    kinds = linear_kinds(model)
    quantised = {part for (part, kind) in kinds if kind == "Linear4bit"}
    assert quantised == {"model.language_model"}, kinds
    assert kinds[("model.vision_tower", "Linear")] > 0 and kinds[("lm_head", "Linear")] == 1


def test_family_comes_from_the_config(tiny_model_dir, tiny_gemma4_dir):
    from transformers import AutoConfig

    assert family_of(AutoConfig.from_pretrained(tiny_model_dir)).name == "gemma3"
    assert family_of(AutoConfig.from_pretrained(tiny_gemma4_dir)).name == "gemma4"
    with pytest.raises(FamilyError, match="model_type 'llama' is not a supported family"):
        family_of("llama")
    with pytest.raises(FamilyError, match="--image_tokens 100: Gemma 4 takes one of 70, 140"):
        get_family("gemma4").set_image_tokens(load_processor(str(tiny_gemma4_dir)), 100)


def test_gemma3n_without_timm_is_a_one_line_error_naming_the_model(tmp_path):
    import subprocess
    import sys

    from transformers import Gemma3nConfig

    try:
        get_family("gemma3n").check_available()
        pytest.skip("timm and torchvision import here (a GPU install): Gemma 3n runs, see scripts/gpu_checks/")
    except FamilyError:
        pass
    Gemma3nConfig().save_pretrained(tmp_path / "g3n")  # a config is enough: the check comes before any weight
    with pytest.raises(ModelLoadError, match=r"g3n: Gemma 3n needs timm and a torchvision"):
        load_model(str(tmp_path / "g3n"))
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/evaluate.py",
            "--model_name",
            str(tmp_path / "g3n"),
            "--dataset_path",
            str(write_dataset(tmp_path, 1, seed=0)),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Gemma 3n needs timm and a torchvision" in last, proc.stderr[-500:]


def test_gemma4_sample_is_exactly_what_its_processor_makes(tiny_gemma4_dir, records):
    processor = load_processor(str(tiny_gemma4_dir))
    collator = Collator(processor)
    record = records[0]
    sample = collator.encode(record)
    batch = collator.pad([sample])
    frames = [collator.frames.load(p) for p in record.frames]
    text = collator.prompt_text(record.context, record.question) + collator.answer_text(record.output)
    ref = processor(text=[text], images=[frames], return_tensors="pt", add_special_tokens=False)
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["mm_token_type_ids"], ref["mm_token_type_ids"]) and "token_type_ids" not in batch
    assert torch.equal(batch["pixel_values"], ref["pixel_values"].float())
    assert torch.equal(batch["image_position_ids"], ref["image_position_ids"])
    # 240x160 frames at the tiny's budget 70 with 8-px patches, pooling 2: 60 soft tokens each.
    per_image = get_family("gemma4").tokens_per_image(processor, (240, 160))
    assert int(sample.token_type_ids.sum()) == 4 * 60 == 4 * per_image
    labelled = sample.input_ids[sample.labels != IGNORE_INDEX]
    assert processor.tokenizer.decode(labelled) == record.output + "<turn|>"
    assert collator.sample_length(record) == sample.length  # from the frames' headers, no decoding


def test_gemma4_image_budget_changes_the_prompt(tiny_gemma4_dir, records):
    processor = load_processor(str(tiny_gemma4_dir))
    get_family("gemma4").set_image_tokens(processor, 140)
    sample = Collator(processor).encode(records[0])
    assert int(sample.token_type_ids.sum()) == 4 * 126


def test_gemma4_lora_wraps_the_vision_linears_inside_their_clippable_wrappers(tiny_gemma4_dir):
    model = apply_lora(load_model(str(tiny_gemma4_dir)), r=4, alpha=8, targets="language+vision")
    wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and n.endswith(".linear")]
    assert wrapped and all(".vision_tower.encoder.layers." in n for n in wrapped)
    with pytest.raises(ModelLoadError, match="--lora_targets 'vision'"):
        apply_lora(load_model(str(tiny_gemma4_dir)), targets="vision")


# --- Gemma 4 through training, evaluation and merge (the checks the Gemma 3 tests make)


@pytest.fixture(scope="module")
def eval_dataset(tmp_path_factory):
    from tests.test_evaluate import write_dataset as write_eval_dataset

    return write_eval_dataset(tmp_path_factory.mktemp("g4_eval_data"))


@pytest.fixture(scope="module")
def confident_gemma4_dir(tiny_gemma4_dir, eval_dataset, tmp_path_factory):
    """The tiny Gemma 4 fine-tuned (answer-only loss from the Collator labels) on the first 3 samples."""
    from pokemon_gemma.modeling import load_for_inference

    torch.manual_seed(0)
    model, processor = load_for_inference(str(tiny_gemma4_dir), device="cpu")
    batch = Collator(processor, 2048, "images")(load_records(eval_dataset)[:3])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05, f"the tiny Gemma 4 did not fit 3 samples (loss {loss.item():.3f})"
    out = tmp_path_factory.mktemp("confident_gemma4")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.mark.slow  # trains the confident model
def test_gemma4_score_and_generate_agree_on_a_confident_model(confident_gemma4_dir, eval_dataset, tmp_path):
    from tests.test_evaluate import run_eval

    scored = run_eval(confident_gemma4_dir, eval_dataset, tmp_path / "score", limit=3)
    generated = run_eval(
        confident_gemma4_dir, eval_dataset, tmp_path / "gen", limit=3, mode="generate", max_new_tokens=48
    )
    read = lambda d: [json.loads(x) for x in (tmp_path / d / "predictions.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["predicted"] for r in read("score")] == [r["predicted"] for r in read("gen")] == ["up", "down", "left"]
    assert scored["accuracy"] == generated["accuracy"] == 1.0 and generated["json_valid_rate"] == 1.0


def test_gemma4_merge_is_verified_and_answers_like_the_adapter(tiny_gemma4_dir, eval_dataset, tmp_path):
    from pokemon_gemma.export import merge_lora
    from tests.test_evaluate import _probabilities, run_eval

    torch.manual_seed(0)
    peft_model = apply_lora(load_model(str(tiny_gemma4_dir)), r=4, alpha=8, targets="language+vision")
    with torch.no_grad():  # lora_B starts at zero (adapter = base); give it weights that change the answers
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    peft_model.save_pretrained(tmp_path / "adapter")
    manifest = merge_lora(
        str(tiny_gemma4_dir), tmp_path / "adapter", tmp_path / "merged", dtype="fp32", verify=True, n_samples=2
    )
    check = manifest["verification"]
    assert check["passed"] and check["max_abs_logit_diff"] <= 1e-3 < check["adapter_effect"], check
    adapted = run_eval(tmp_path / "adapter", eval_dataset, tmp_path / "adapted", limit=3)
    merged = run_eval(tmp_path / "merged", eval_dataset, tmp_path / "merged_eval", limit=3)
    assert (adapted["model_kind"], merged["model_kind"]) == ("adapter", "merged")
    for a_row, m_row in zip(_probabilities(tmp_path / "adapted"), _probabilities(tmp_path / "merged_eval")):
        assert m_row == pytest.approx(a_row, abs=1e-5)


@pytest.mark.slow  # trains the confident model and exports it
def test_gemma4_mlx_export_matches_pytorch_and_scores_like_it(confident_gemma4_dir, eval_dataset, tmp_path):
    pytest.importorskip("mlx_vlm")
    from pokemon_gemma.export import export_mlx
    from tests.test_evaluate import run_eval

    manifest = export_mlx(confident_gemma4_dir, tmp_path / "mlx", quantization_bits=None, n_samples=4)
    assert [f["fix"] for f in manifest["fixes_applied"]] == ["fix_global_head_dim"]  # no Gemma 3 prefix rename
    check = manifest["verification"]
    assert check["passed"] and check["logits"]["max_abs_diff"] <= 1e-3, check["logits"]
    assert check["buttons"]["agreement_vs_pytorch_causal"] == 1.0
    torch_eval = run_eval(confident_gemma4_dir, eval_dataset, tmp_path / "torch", limit=3)
    mlx_eval = run_eval(tmp_path / "mlx", eval_dataset, tmp_path / "mlx_eval", limit=3)
    generated = run_eval(
        tmp_path / "mlx", eval_dataset, tmp_path / "mlx_gen", limit=3, mode="generate", max_new_tokens=48
    )
    assert mlx_eval["model_kind"] == "mlx" and mlx_eval["accuracy"] == torch_eval["accuracy"] == 1.0
    assert generated["accuracy"] == 1.0 and generated["json_valid_rate"] == 1.0
    raw = [json.loads(x)["raw_output"] for x in (tmp_path / "mlx_gen" / "predictions.jsonl").read_text().splitlines()]
    assert json.loads(raw[0])["button"] == "up"


def test_gemma3n_mlx_export_is_refused_with_the_reason(tmp_path):
    from transformers import Gemma3nConfig

    from pokemon_gemma.export import ExportError, export_mlx

    Gemma3nConfig().save_pretrained(tmp_path / "g3n")
    (tmp_path / "g3n" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ExportError, match="mlx-vlm 0.7.10 cannot export Gemma 3n"):
        export_mlx(tmp_path / "g3n", tmp_path / "out")


@pytest.mark.slow  # runs the training CLI
def test_gemma4_image_budget_is_a_training_setting_saved_with_the_run(tiny_gemma4_dir, tiny_model_dir, tmp_path):
    import subprocess

    from tests.test_train import ENV, train_cmd

    train = write_dataset(tmp_path, 4, seed=0)
    proc = subprocess.run(
        train_cmd(tiny_gemma4_dir, train, "", tmp_path / "run", "--max_steps", "1", "--image_tokens", "140"),
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    processor = load_processor(str(tmp_path / "run"))  # evaluation and serving load the run's processor
    assert get_family("gemma4").image_tokens_setting(processor) == 140
    assert int(Collator(processor).encode(load_records(train)[0]).token_type_ids.sum()) == 4 * 126
    for model, budget, message in ((tiny_gemma4_dir, "100", "Gemma 4 takes one of"), (tiny_model_dir, "70", "fixed")):
        bad = subprocess.run(
            train_cmd(model, train, "", tmp_path / f"bad{budget}", "--max_steps", "1", "--image_tokens", budget),
            cwd=REPO_ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=600,
        )
        last = bad.stderr.strip().splitlines()[-1]
        assert bad.returncode != 0 and f"--image_tokens {budget}" in last and message in last, bad.stderr[-800:]


@pytest.mark.slow  # starts the server
def test_gemma4_server_predicts_and_cached_frame_features_answer_like_fresh_ones(tiny_gemma4_dir, tmp_path):
    import math

    from pokemon_gemma.dataset import BUTTONS
    from pokemon_gemma.serve.client import predict_payload
    from pokemon_gemma.serve.launch import ServerProcess
    from tests.test_serve import FRAMES, client

    with ServerProcess(["--model_path", str(tiny_gemma4_dir)], log_path=tmp_path / "server.log", cwd=tmp_path) as srv:
        with client(srv.url) as c:
            stream = [
                c.post("/v1/predict", json=predict_payload(FRAMES[i : i + 4], session_id="g4")).json() for i in range(3)
            ]
            fresh = [c.post("/v1/predict", json=predict_payload(FRAMES[i : i + 4])).json() for i in range(3)]
            r = c.post("/v1/predict", json={**predict_payload(FRAMES[:4], mode="generate"), "max_new_tokens": 8})
    assert r.status_code == 200 and r.json()["mode"] == "generate"
    assert [s["cache"] for s in stream] == [{"hits": 0, "frames_encoded": 4}] + [{"hits": 3, "frames_encoded": 1}] * 2
    for s, f in zip(stream, fresh):
        assert s["button"] == f["button"] and sorted(s["probabilities"]) == sorted(BUTTONS)
        assert all(math.isclose(s["probabilities"][b], f["probabilities"][b], abs_tol=1e-5) for b in BUTTONS)


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_gemma4_dir"])
def test_image_token_types_change_attention_only_where_the_family_says(fixture, request, records):
    # Gemma 3: images attend bidirectionally inside an image given token types; Gemma 4 E2B/E4B-like
    # (use_bidirectional_attention None): causally either way, so the types change nothing.
    folder = str(request.getfixturevalue(fixture))
    model, processor = load_model(folder).eval(), load_processor(folder)
    collator = Collator(processor)
    batch = collator.pad([collator.encode(records[0])])
    batch.pop("labels")
    with torch.no_grad():
        typed = model(**batch).logits
        untyped = model(**{k: v for k, v in batch.items() if k != collator.family.token_type_key}).logits
    differs = float((typed - untyped).abs().max()) > 1e-4
    assert differs == collator.family.images_bidirectional(model.config)


def test_make_tiny_model_bidirectional_images_is_gemma4_only(tmp_path):
    # --bidirectional_images builds the 26B/31B attention setting (images attend both ways on sliding layers).
    script = [sys.executable, "scripts/make_tiny_model.py", "--output_dir"]
    out = subprocess.run(
        [*script, str(tmp_path / "g4"), "--family", "gemma4", "--bidirectional_images", "--hidden_size", "128"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    model = load_model(str(tmp_path / "g4")).eval()
    assert model.config.get_text_config().use_bidirectional_attention == "vision"
    assert model.config.get_text_config().hidden_size == 128
    collator = Collator(load_processor(str(tmp_path / "g4")))
    assert collator.family.images_bidirectional(model.config)
    refused = subprocess.run(
        [*script, str(tmp_path / "g3"), "--bidirectional_images"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert (
        refused.returncode == 2
        and refused.stderr == "error: --bidirectional_images is a Gemma 4 setting, not Gemma 3's\n"
    )
    assert not (tmp_path / "g3").exists()
    narrow = subprocess.run(
        [*script, str(tmp_path / "g3"), "--hidden_size", "96"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert narrow.returncode == 2 and narrow.stderr == "error: --hidden_size 96: use a positive multiple of 64\n"
    assert not (tmp_path / "g3").exists()

    # mlx-vlm would make those images bidirectional on full layers too: the export and the pipeline refuse it.
    export = subprocess.run(
        [
            sys.executable,
            "scripts/convert_to_mlx.py",
            "--model_path",
            str(tmp_path / "g4"),
            "--output_path",
            str(tmp_path / "mlx"),
            "--quantization_bits",
            "none",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    reason = "mlx-vlm 0.7.10 makes images attend bidirectionally on every layer"
    assert export.returncode == 2 and reason in export.stderr, export.stderr
    assert "Traceback" not in export.stderr and not (tmp_path / "mlx").exists()
    export_stage = next(stage for stage in STAGES if stage.name == "export_mlx")
    assert reason in export_stage.skip(SimpleNamespace(model_dir=str(tmp_path / "g4")))
    causal = tmp_path / "causal"
    causal.mkdir()
    config = json.loads((tmp_path / "g4" / "config.json").read_text())
    config["text_config"]["use_bidirectional_attention"] = None
    (causal / "config.json").write_text(json.dumps(config))
    assert export_stage.skip(SimpleNamespace(model_dir=str(causal))) is None
