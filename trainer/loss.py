"""The SFT loss of one micro-batch: next-token cross-entropy summed over trained tokens, plus the router aux loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.data.render import IGNORE_INDEX


def forward_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed token cross-entropy [] (fp32) and the model's aux loss [] (None if the config does not compute it).

    batch: input_ids, targets, position_ids: [B, S] on the model's device; targets are already shifted.
    No attention mask and no KV cache: transformers then reads sample boundaries from the restarting
    position_ids and masks attention block-diagonally (a cache would turn that detection off).
    """
    outputs = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    logits_BSV = outputs.logits
    loss_sum = F.cross_entropy(
        logits_BSV.float().flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, getattr(outputs, "aux_loss", None)
