"""Foundation: settings precedence and secret masking, and the tiny model loading like a hub id."""

import json
import logging
import subprocess
import sys

import pytest
import torch
from PIL import Image

from pokemon_gemma import config as cfg
from tests.conftest import REPO_ROOT

SECRET = "hf_TOPSECRET_0123456789abcdef"


def test_precedence_cli_over_env_over_dotenv_over_default(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("BATCH_SIZE=3\nLEARNING_RATE=0.5\nLORA_R=8\n")
    s = cfg.load_settings(env_file, environ={"LEARNING_RATE": "0.25"})
    assert (s.batch_size, s.learning_rate, s.lora_r, s.grad_accum) == (3, 0.25, 8, 4)
    import argparse

    parser = argparse.ArgumentParser()
    cfg.add_settings_args(parser, s, ["batch_size", "learning_rate", "use_peft"])
    args = parser.parse_args(["--batch_size", "7", "--no-use_peft"])
    s2 = cfg.settings_from_args(s, args)
    assert (s2.batch_size, s2.learning_rate, s2.use_peft) == (7, 0.25, False)


@pytest.mark.parametrize(
    "line,name",
    [("BATCH_SIZE=two", "BATCH_SIZE"), ("USE_QLORA=maybe", "USE_QLORA"), ("LR_SCHEDULER=sawtooth", "LR_SCHEDULER")],
)
def test_wrong_type_names_the_variable(tmp_path, line, name):
    env_file = tmp_path / ".env"
    env_file.write_text(line + "\n")
    with pytest.raises(cfg.SettingsError) as exc:
        cfg.load_settings(env_file, environ={})
    assert name in str(exc.value) and "\n" not in str(exc.value)


def test_secret_from_dotenv_never_in_logs_or_saved_config(tmp_path, capsys, monkeypatch):
    env_file = tmp_path / ".env"
    env_file.write_text(f"HUGGINGFACE_TOKEN={SECRET}\nWANDB_API_KEY={SECRET}x\n")
    monkeypatch.delenv("HUGGINGFACE_TOKEN", raising=False)
    s = cfg.load_settings(env_file, environ={})
    assert s.hub_token == SECRET
    log = cfg.setup_logging(s)
    log.info("loading with token %s and settings %s", s.hub_token, s)
    logging.getLogger("transformers").warning(f"leaky {SECRET}")
    saved = tmp_path / "run_config.json"
    saved.write_text(json.dumps(s.masked()))
    err = capsys.readouterr().err
    assert "loading with token" in err and SECRET not in err and cfg.MASK in err
    text = saved.read_text()
    assert SECRET not in text and json.loads(text)["huggingface_token"] == cfg.MASK


@pytest.mark.slow  # builds the model in a subprocess
def test_tiny_model_loads_through_auto_classes_and_runs_4_images(tmp_path):
    out = tmp_path / "tiny"
    proc = subprocess.run(
        [sys.executable, "scripts/make_tiny_model.py", "--output_dir", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    size = sum(p.stat().st_size for p in out.iterdir())
    assert size < 5_000_000
    from transformers import AutoModelForImageTextToText, AutoProcessor, Gemma3ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert isinstance(model, Gemma3ForConditionalGeneration)
    tok = processor.tokenizer
    for name in ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"):
        assert tok.convert_tokens_to_ids(name) != tok.unk_token_id
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    messages = [{"role": "user", "content": [{"type": "image"}] * 4 + [{"type": "text", "text": "Next button?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images = [Image.new("RGB", (240, 160), (40 * i, 80, 120)) for i in range(4)]
    batch = processor(text=[text], images=[images], return_tensors="pt", add_special_tokens=False)
    ids = batch["input_ids"][0]
    assert int((ids == tok.bos_token_id).sum()) == 1
    assert int((ids == processor.tokenizer.image_token_id).sum()) == 4 * model.config.mm_tokens_per_image
    assert "token_type_ids" in batch
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, ids.shape[0], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    # The projector must not be all zeros (it is created as zeros upstream).
    assert model.model.multi_modal_projector.mm_input_projection_weight.abs().sum() > 0


def test_env_example_documents_every_setting_and_loads():
    from dataclasses import fields

    example = REPO_ROOT / ".env.example"
    keys = [line.split("=", 1)[0] for line in example.read_text().splitlines() if line and not line.startswith("#")]
    assert sorted(keys) == sorted(f.name.upper() for f in fields(cfg.Settings))
    assert cfg.load_settings(example, environ={}) == cfg.Settings()
