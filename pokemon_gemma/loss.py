"""Token-level loss at supervised positions only.

The model is called without `labels`: Gemma 3's 262k-entry vocabulary makes full-sequence fp32
logits huge, so logits are computed only where the next token is labelled (`logits_to_keep` with
the union of those positions over the batch), and the cross-entropy is returned as a SUM. The
training loop divides by the number of supervised tokens of the whole optimizer step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .collate import IGNORE_INDEX


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose logits predict a labelled token (union over the batch)."""
    next_is_labelled = (labels[:, 1:] != IGNORE_INDEX).any(dim=0)
    return next_is_labelled.nonzero().flatten()


def loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over labelled tokens, number of labelled tokens) for one micro-batch."""
    labels = batch["labels"]
    positions = supervised_positions(labels)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=positions, use_cache=False).logits  # (B, P, V)
    targets = labels[:, positions + 1]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())
