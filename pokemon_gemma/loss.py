"""Token-level loss at supervised positions only.

The model is called without `labels`: Gemma 3's 262k-entry vocabulary makes full-sequence fp32
logits huge, so logits are computed only where the next token is labelled (`logits_to_keep` with
the union of those positions over the batch), and the cross-entropy is returned as a SUM. The
training loop divides by the number of supervised tokens of the whole optimizer step.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.nn.functional as F

from .collate import IGNORE_INDEX

log = logging.getLogger(__name__)


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose logits predict a labelled token (union over the batch)."""
    next_is_labelled = (labels[:, 1:] != IGNORE_INDEX).any(dim=0)
    return next_is_labelled.nonzero().flatten()


def loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over labelled tokens, number of labelled tokens) for one micro-batch."""
    labels = batch["labels"]
    positions = supervised_positions(labels)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    masks = gemma3_attention_masks(model, batch)
    if masks is not None:
        inputs["attention_mask"] = masks
    logits = model(**inputs, logits_to_keep=positions, use_cache=False).logits  # (B, P, V)
    targets = labels[:, positions + 1]
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((targets != IGNORE_INDEX).sum())


# --- Gemma 3 attention masks without torch.vmap (performance only; same masks as transformers)
_MASKS_VERIFIED: dict[tuple, bool] = {}  # (config class, sliding window) -> equal to transformers'
# Micro-batches per mask path: "precomputed" (built here) or "model" (transformers builds them). Tests read
# it to know which path a loss went through.
MASK_PATHS: Counter[str] = Counter()


def _text_config(model):
    while hasattr(model, "module"):  # DDP and similar wrappers
        model = model.module
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "gemma3":
        return None
    return config.get_text_config()


def _build_masks(attention_mask: torch.Tensor, token_type_ids: torch.Tensor, sliding_window: int) -> dict:
    """sdpa boolean masks (B, 1, T, T), True = attend: causal OR same-image block, on real (unpadded)
    keys; the sliding layers also need kv > q - window."""
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    idx = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    block = get_block_sequence_ids_for_mask(token_type_ids, device=attention_mask.device)
    same_image = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
    full = ((idx[None, :] <= idx[:, None]) | same_image) & attention_mask.bool()[:, None, :]
    sliding = full & (idx[None, :] > idx[:, None] - sliding_window)
    return {"full_attention": full[:, None], "sliding_attention": sliding[:, None]}


def gemma3_attention_masks(model, batch: dict[str, torch.Tensor]) -> dict | None:
    """Gemma 3's training masks built with plain tensor ops, or None to let the model build them.

    transformers builds the bidirectional-image masks through torch.vmap, measured at ~9% of a tiny
    model's CPU training step (bench/bench_train.py). Used only with sdpa attention, and only after
    the first batch's masks were checked equal to transformers' own (else a warning and None)."""
    config = _text_config(model)
    if (
        config is None
        or getattr(config, "_attn_implementation", None) != "sdpa"
        or getattr(config, "use_bidirectional_attention", False)
        or "token_type_ids" not in batch
        or batch.get("attention_mask") is None
        or batch["attention_mask"].dim() != 2
    ):
        MASK_PATHS["model"] += 1
        return None
    masks = _build_masks(batch["attention_mask"], batch["token_type_ids"], config.sliding_window)
    key = (type(config).__name__, config.sliding_window)
    if key not in _MASKS_VERIFIED:
        _MASKS_VERIFIED[key] = _same_as_transformers(config, batch, masks)
        if not _MASKS_VERIFIED[key]:
            log.warning("precomputed Gemma 3 attention masks differ from transformers'; using the model's own")
    MASK_PATHS["precomputed" if _MASKS_VERIFIED[key] else "model"] += 1
    return masks if _MASKS_VERIFIED[key] else None


def _same_as_transformers(config, batch: dict[str, torch.Tensor], masks: dict) -> bool:
    from transformers.models.gemma3.modeling_gemma3 import (
        create_masks_for_vision_model,
        get_block_sequence_ids_for_mask,
    )

    am = batch["attention_mask"]
    embeds = torch.empty(am.shape[0], am.shape[1], 1, device=am.device)  # only shape/device/dtype are read
    try:
        ref = create_masks_for_vision_model(
            config, embeds, am, None, None, get_block_sequence_ids_for_mask(batch["token_type_ids"], am.device)
        )
    except Exception as exc:  # noqa: BLE001 - a changed transformers API: fall back to the model's masks
        log.warning("cannot verify precomputed attention masks (%s)", type(exc).__name__)
        return False
    return all(
        isinstance(ref.get(k), torch.Tensor) and ref[k].shape == masks[k].shape and torch.equal(ref[k], masks[k])
        for k in masks
    )
