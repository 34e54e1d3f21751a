"""Loading a Gemma 3 model + processor from a hub id or a local folder, and LoRA/QLoRA wrapping.

A tiny local model and `google/gemma-3-4b-it` take exactly the same path through here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .errors import first_line

log = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# LoRA targets as regexes over transformers-5 module names of Gemma3ForConditionalGeneration.
_TEXT = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
_VISION = r"model\.vision_tower\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc(1|2))"
LORA_TARGETS = {
    "language": _TEXT,
    "language+vision": f"({_TEXT}|{_VISION})",
    "all-linear": "all-linear",
}


class ModelLoadError(RuntimeError):
    """The model or processor could not be loaded; the message says why and what to do."""


def _token_kwargs(token: str | None) -> dict:
    return {"token": token} if token else {}


def load_processor(model_name: str, token: str | None = None):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model_name, **_token_kwargs(token))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_explain(model_name, exc)) from None


def _explain(model_name: str, exc: Exception) -> str:
    first = first_line(exc)
    if not Path(model_name).exists() and "/" in model_name:
        return (
            f"cannot load {model_name!r}: {first} (a hub id needs network access, and gated Gemma models "
            "need HUGGINGFACE_TOKEN in .env; or pass a local folder)"
        )
    return f"cannot load {model_name!r}: {first}"


def bnb_4bit_config(quant_storage_bf16: bool = False):
    """QLoRA: nf4 with double quantisation and bf16 compute; the vision tower stays unquantised.

    `quant_storage_bf16` (FSDP): FSDP shards floating tensors only; with the default uint8 storage
    every 4-bit weight stays whole on every rank ("Found N non-floating frozen Params4bit. Excluding
    from FSDP2 sharding"), so store them as bf16 (= the compute dtype)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16 if quant_storage_bf16 else torch.uint8,
        llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"],
    )


def load_model(
    model_name: str,
    *,
    precision: str = "no",
    qlora: bool = False,
    token: str | None = None,
    device_map=None,
    quant_storage_bf16: bool = False,
):
    """Load Gemma3ForConditionalGeneration in the requested precision (or 4-bit for QLoRA)."""
    from transformers import AutoModelForImageTextToText

    kwargs = dict(dtype=DTYPES[precision], **_token_kwargs(token))
    if qlora:
        kwargs["quantization_config"] = bnb_4bit_config(quant_storage_bf16)
        kwargs["dtype"] = torch.bfloat16
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForImageTextToText.from_pretrained(model_name, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_explain(model_name, exc)) from None
    if getattr(model.config, "model_type", None) != "gemma3":
        raise ModelLoadError(f"{model_name!r} is a {model.config.model_type!r} model, not Gemma 3 (gemma3)")
    return model


def apply_lora(
    model,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    targets: str = "language",
    qlora: bool = False,
    gradient_checkpointing: bool = False,
    init_adapter: str | None = None,
):
    """Wrap the model in a LoRA adapter over the chosen projections; with `init_adapter`, the adapter
    (config and weights) of an earlier run instead, trainable, to continue training it."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if init_adapter:
        try:
            return PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ModelLoadError(
                f"--init_adapter {init_adapter}: {first_line(exc)} (pass a LoRA adapter folder "
                "trained on this base model)"
            ) from None
    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=LORA_TARGETS[targets],
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def load_for_inference(
    model_name: str,
    adapter_path: str | None = None,
    *,
    precision: str = "no",
    token: str | None = None,
    device: str | None = None,
):
    """(model, processor) in eval mode; `adapter_path` adds a LoRA adapter on top of the base.

    The processor comes from the adapter folder when it has one (training saves it there)."""
    from peft import PeftModel

    from .artifacts import is_adapter_dir

    model = load_model(model_name, precision=precision, token=token)
    proc_source = (
        adapter_path if adapter_path and (Path(adapter_path) / "processor_config.json").is_file() else model_name
    )
    processor = load_processor(proc_source, token=token)
    if adapter_path:
        if not is_adapter_dir(adapter_path):
            raise ModelLoadError(f"{adapter_path}: no adapter_config.json (not a LoRA adapter folder)")
        model = PeftModel.from_pretrained(model, adapter_path)
    device = device or default_device()
    model.to(device).eval()
    return model, processor


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"
