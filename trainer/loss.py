"""The SFT loss of one micro-batch: next-token cross-entropy summed over trained tokens, plus the router aux loss.

With `fused_ce` the LM head itself returns the summed cross-entropy (`trainer.kernels.linear_cross_entropy`: chunks
of rows, each chunk's loss and logit gradient one torch.compile'd function on CUDA, eager if compiling fails), so the
[B, S, V] logits never exist. The head is patched
rather than bypassed so the model's own forward still runs end to end: FSDP2's hooks on the head and HF's router
aux loss stay exactly as they are. Heads with a bias or logit scaling fall back to plain logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.data.render import IGNORE_INDEX
from trainer.kernels.linear_cross_entropy import linear_cross_entropy_sum

_TARGETS = "_moe_loss_targets_N"  # set on the head only for the duration of one forward
_LOGIT_SCALING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def forward_loss_sum(model, batch: dict[str, torch.Tensor], fused_ce: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed token cross-entropy [] (fp32; fp64 for an fp64 model without the fused loss) and the model's aux loss []
    (None if the config does not compute it).

    batch: input_ids, targets, position_ids: [B, S] on the model's device; targets are already shifted.
    No attention mask and no KV cache: transformers then reads sample boundaries from the restarting
    position_ids and masks attention block-diagonally (a cache would turn that detection off).
    """
    head = fused_loss_head(model) if fused_ce else None
    if head is None:
        outputs = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        logits = outputs.logits  # bf16/fp16 upcast to fp32; an fp64 model keeps fp64
        logits = logits if logits.dtype == torch.float64 else logits.float()
        loss_sum = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        return loss_sum, getattr(outputs, "aux_loss", None)
    head.__dict__[_TARGETS] = batch["targets"].flatten()
    try:
        outputs = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    finally:
        head.__dict__[_TARGETS] = None
    return outputs.logits.float().reshape(()), getattr(outputs, "aux_loss", None)


def fused_loss_head(model) -> torch.nn.Module | None:
    """The LM head patched (once) to return the summed loss while targets are set, or None where that is unsafe."""
    head = model.get_output_embeddings()
    scaled = any(getattr(model.config, name, None) not in (None, 1.0) for name in _LOGIT_SCALING)
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or scaled:
        return None
    if _TARGETS not in head.__dict__:
        head.forward = _head_forward.__get__(head)
        head.__dict__[_TARGETS] = None
    return head


def _head_forward(self, hidden_BSD: torch.Tensor) -> torch.Tensor:
    """Plain logits [B, S, V] outside the loss; the summed cross-entropy [] while targets are set."""
    targets_N = self.__dict__.get(_TARGETS)
    if targets_N is None:
        return F.linear(hidden_BSD, self.weight)
    h_ND, w_VD = hidden_BSD.flatten(0, 1), self.weight
    device_type = h_ND.device.type
    if torch.is_autocast_enabled(device_type):
        # bf16-mixed: the matmuls run in the autocast dtype as F.linear would; the kernels want one dtype.
        dtype = torch.get_autocast_dtype(device_type)
        h_ND, w_VD = h_ND.to(dtype), w_VD.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return linear_cross_entropy_sum(h_ND, w_VD, targets_N, IGNORE_INDEX)
    if h_ND.dtype != w_VD.dtype:
        h_ND = h_ND.to(w_VD.dtype)
    return linear_cross_entropy_sum(h_ND, w_VD, targets_N, IGNORE_INDEX)
