"""Loading a Gemma model + processor from a hub id or a local folder, and LoRA/QLoRA wrapping.

A tiny local model and a hub id take exactly the same path through here; what differs per model
family (Gemma 3, Gemma 4, Gemma 3n: LoRA targets, modules QLoRA keeps unquantised, the processor
class) comes from `pokemon_gemma.families`, chosen by the model's config.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .errors import first_line
from .families import FAMILIES, Family, FamilyError, family_of, get_family

log = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Gemma 3's LoRA targets (regexes over transformers-5 module names); other families: families/*.py.
LORA_TARGETS = get_family("gemma3").lora_targets


class ModelLoadError(RuntimeError):
    """The model or processor could not be loaded; the message says why and what to do."""


def _token_kwargs(token: str | None) -> dict:
    return {"token": token} if token else {}


def family_for(model_name: str, token: str | None = None) -> Family:
    """The family of a model folder or hub id: from a local processor_config.json's processor class
    (adapter folders carry one), else from the model's config."""
    import json

    proc_config = Path(model_name) / "processor_config.json"
    if proc_config.is_file():
        try:
            cls = json.loads(proc_config.read_text()).get("processor_class", "")
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{proc_config}: unreadable ({first_line(exc)})") from None
        for family in FAMILIES.values():
            if family.processor_class == cls:
                return family
    return family_for_model(model_name, token)


def load_processor(model_name: str, token: str | None = None, image_tokens: int = 0):
    """The model's processor; `image_tokens` sets Gemma 4's soft-token budget per image (0: the model's)."""
    family = family_for(model_name, token)
    try:
        family.check_available()  # also for a folder whose processor_config named the family
        processor = family.load_processor(model_name, **_token_kwargs(token))
        family.set_image_tokens(processor, image_tokens)
        return processor
    except FamilyError as exc:
        raise ModelLoadError(f"{model_name}: {exc}") from None
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(_explain(model_name, exc)) from None


def _explain(model_name: str, exc: Exception) -> str:
    first = first_line(exc)
    if not Path(model_name).exists() and "/" in model_name:
        return (
            f"cannot load {model_name!r}: {first} (a hub id needs network access, and gated Gemma models "
            "need HUGGINGFACE_TOKEN in .env; or pass a local folder)"
        )
    return f"cannot load {model_name!r}: {first}"


def bnb_4bit_config(family: Family, quant_storage_bf16: bool = False):
    """QLoRA: nf4 with double quantisation and bf16 compute; the family's vision (and audio) side and
    lm_head stay unquantised. transformers matches skip names from the start of the full module name,
    so they must be full names ("model.vision_tower": a bare "vision_tower" skipped nothing).

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
        llm_int8_skip_modules=list(family.qlora_skip_modules),
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
    """Load a supported family's *ForConditionalGeneration in the requested precision (or 4-bit for QLoRA)."""
    from transformers import AutoModelForImageTextToText

    family = family_for_model(model_name, token)
    kwargs = dict(dtype=DTYPES[precision], **_token_kwargs(token))
    if qlora:
        kwargs["quantization_config"] = bnb_4bit_config(family, quant_storage_bf16)
        kwargs["dtype"] = torch.bfloat16
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForImageTextToText.from_pretrained(model_name, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(_explain(model_name, exc)) from None
    return model


def family_for_model(model_name: str, token: str | None = None) -> Family:
    """The family of a model folder or hub id from its config (a clear error for other models, and
    for a family this install cannot run)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_name, **_token_kwargs(token))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_explain(model_name, exc)) from None
    try:
        family = family_of(config)
        family.check_available()
    except FamilyError as exc:
        raise ModelLoadError(f"{model_name}: {exc}") from None
    return family


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
    family = family_of(model.config)
    try:
        target_modules = family.lora_target(targets)
    except FamilyError as exc:
        raise ModelLoadError(str(exc)) from None
    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        exclude_modules=family.lora_exclude if target_modules == "all-linear" else None,
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
