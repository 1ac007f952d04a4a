"""A parallel layout (what `parallel.*` and `train.micro_batch_size` choose) and the options around it."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.errors import UserError

from trainer.parallel.checkpointing import MODES as CHECKPOINTING
DISPATCHERS = ("alltoall", "allgather", "deepep")


@dataclass(frozen=True)
class Layout:
    """One way to lay a job out on `world_size` GPUs.

    Mesh rule (as torchtitan): world = dp_replicate x dp_shard; non-expert weights are FSDP2-sharded over dp_shard
    ranks; experts are split over ep ranks (ep divides dp_shard) and FSDP2-sharded over the dp_shard / ep ranks left.
    `checkpointing`: `trainer.parallel.checkpointing.MODES` (none | full | attention | moe).
    `reshard_after_forward`: FSDP2 frees each layer's gathered weights after its forward and gathers them again for
    its backward (True), or keeps them from forward to backward (False, "zero2": one all-gather per step, the
    gathered weights of every layer held at the start of the backward).
    """

    world_size: int
    ep_size: int = 1
    dp_shard: int = -1  # -1: all ranks (world_size / dp_replicate)
    micro_batch: int = 1
    seq_len: int = 4096
    checkpointing: str = "none"
    dispatcher: str = "alltoall"
    reshard_after_forward: bool = True

    def __post_init__(self):
        if self.dp_shard == -1:
            object.__setattr__(self, "dp_shard", self.world_size)
        if self.checkpointing not in CHECKPOINTING:
            raise UserError(f"unknown activation checkpointing '{self.checkpointing}'", f"use one of {CHECKPOINTING}")
        if self.dispatcher not in DISPATCHERS:
            raise UserError(f"unknown dispatcher '{self.dispatcher}'", f"use one of {DISPATCHERS}")
        if self.world_size % self.dp_shard:
            raise UserError(f"dp_shard {self.dp_shard} does not divide {self.world_size} GPUs",
                            "choose a dp_shard that divides the GPU count")
        if self.dp_shard % self.ep_size:
            raise UserError(f"ep_size {self.ep_size} does not divide dp_shard {self.dp_shard}",
                            "choose ep_size among the divisors of the sharding group")

    @property
    def dp_replicate(self) -> int:
        return self.world_size // self.dp_shard

    @property
    def expert_fsdp(self) -> int:
        """FSDP degree of the expert weights (NeMo's ep_shard, HF's efsdp)."""
        return self.dp_shard // self.ep_size

    @property
    def tokens(self) -> int:
        """Tokens in one micro-batch on one rank."""
        return self.micro_batch * self.seq_len

    def describe(self) -> str:
        hsdp = f" rep={self.dp_replicate}" if self.dp_replicate > 1 else ""
        zero2 = "" if self.reshard_after_forward else " zero2"
        return f"ep={self.ep_size} shard={self.dp_shard}{hsdp} mb={self.micro_batch} ckpt={self.checkpointing}{zero2}"

    def overrides(self, current: Layout | None = None) -> str:
        """The recipe overrides that select this layout (mesh keys only when HSDP is used or `current` differs)."""
        parts = [f"parallel.ep_size={self.ep_size}"]
        if self.dp_replicate > 1 or (current is not None and current.dp_replicate != self.dp_replicate):
            parts += [f"parallel.dp_replicate_size={self.dp_replicate}", f"parallel.dp_shard_size={self.dp_shard}"]
        parts += [f"train.micro_batch_size={self.micro_batch}", f"parallel.activation_checkpointing={self.checkpointing}"]
        if not self.reshard_after_forward or (current is not None and not current.reshard_after_forward):
            parts.append(f"parallel.reshard_after_forward={str(self.reshard_after_forward).lower()}")
        return " ".join(parts)


@dataclass(frozen=True)
class PlanOptions:
    """Assumptions that are not part of the layout.

    capacity_factor: under EP the busiest rank receives this many times the mean rows (routing imbalance);
    keep_outputs: the training loop still holds the model outputs (logits) during backward and the optimizer step
        (the trainer drops them; HF-style loops that keep `outputs` pay for the logits);
    fsdp: apply FSDP2 (None: when dp_shard > 1 or the precision keeps fp32 masters, which FSDP2 casts);
    deepep_buffer_gib: the DeepEP NVLink buffer allocated once per rank;
    adapter_params: LoRA (`lora.enabled`): the adapter parameters of the whole model (`trainer.lora.plan`); the base
        is then frozen (its weights only, in the precision's param dtype) and the adapters train in fp32 with fp32
        AdamW states. None: a full fine-tune;
    optimizer_fused: AdamW without the foreach temporary (torch's fused kernel, or the trainer's Triton one);
    fused_ce: the LM head and cross-entropy in chunks (`perf.fused_ce`), never the whole fp32 logits; False: HF's loss;
    fused_experts: the memory-lean expert MLP (`perf.fused_experts`, where it runs: one process or the all-gather
        dispatcher); False: HF's grouped_mm experts.
    The defaults describe transformers' own training loop; `request_from_recipe` describes `moe train` on a GPU.
    """

    precision: str = "bf16-mixed"
    grad_accum_steps: int = 1
    optimizer_fused: bool = False
    capacity_factor: float = 1.25
    keep_outputs: bool = False
    fsdp: bool | None = None
    deepep_buffer_gib: float = 1.0
    adapter_params: int | None = None
    fused_ce: bool = False
    fused_experts: bool = False
