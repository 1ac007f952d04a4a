"""Validation loss during training, the best step, and early stopping.

Every `train.eval_every` optimizer steps (and at the last one) the model, in eval mode and without gradients, runs
the whole validation set through the training step's own forward and loss (`trainer.loss.forward_loss_sum`, the
same fused cross-entropy and autocast). The set is packed into micro-batches once, in stored order; micro-batch j
runs on rank j % world_size, and a rank with fewer runs a batch without targets instead, so every rank runs the
same forwards (FSDP's collectives need that). The result is the token-weighted mean over all ranks:
sum(token losses) / trained tokens, both all-reduced in float64.

A new best sets `improved`: the loop then checkpoints that step, and `saved(step)` records it in `best.json` in the
run directory ({"step", "eval_loss", "checkpoint"}; that checkpoint is kept by pruning). After
`train.early_stop_patience` evaluations without a new best, `should_stop` is true. On resume the best so far is read
back from best.json.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.data.loader import StatefulLoader
from trainer.data.packing import Row, collate
from trainer.data.render import IGNORE_INDEX
from trainer.loss import forward_loss_sum
from trainer.perf import uses_cuda_graphs

BEST_FILE = "best.json"


@dataclass
class EvalResult:
    step: int
    loss: float  # token-mean cross-entropy over the validation set
    tokens: int  # trained (target) tokens it was taken over
    improved: bool

    def record(self, best_loss: float, best_step: int) -> dict:
        return {"step": self.step, "eval_loss": self.loss, "eval_tokens": self.tokens, "best_eval_loss": best_loss,
                "best_step": best_step}


class Evaluator:
    def __init__(self, model, dataset, rt, *, seq_len: int, micro_batch_size: int, pad_id: int, packing: bool,
                 fused_ce: bool, every: int, patience: int = 0, run_dir: Path | None = None, resume_step: int = 0,
                 hooks=None):
        self.model, self.dataset, self.rt = model, dataset, rt
        self.seq_len, self.pad_id, self.packing, self.fused_ce = seq_len, pad_id, packing, fused_ce
        self.every, self.patience, self.run_dir = every, patience, run_dir
        self.hooks = hooks  # the TrainStep: its expert counts, balancer loads and z-loss must not see eval forwards
        rows = _rows(dataset, seq_len, pad_id, packing)
        self.micro_batches = [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
        self.best_loss, self.best_step, self.since_best = math.inf, 0, 0
        if run_dir is not None and resume_step:
            self._restore(resume_step)

    def due(self, step: int, last_step: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == last_step)

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.since_best >= self.patience

    @torch.no_grad()
    def run(self, step: int) -> EvalResult:
        """Evaluate now (every rank must call this at the same step)."""
        rt, was_training = self.rt, self.model.training
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
        targets = torch.zeros((), dtype=torch.float64, device=rt.device)
        graphs = uses_cuda_graphs(self.model)
        try:
            for batch, real in self._rank_batches():
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                batch = {k: v.to(rt.device) for k, v in batch.items()}
                with rt.autocast():
                    token_loss_sum, _ = forward_loss_sum(self.model, batch, self.fused_ce)
                if real:
                    loss_sum += token_loss_sum.double()
                    targets += (batch["targets"] != IGNORE_INDEX).sum().double()
        finally:
            self.model.train(was_training)
            self._forget_hook_state()
        totals = rt.all_reduce_sum(torch.stack([loss_sum, targets]))
        loss, tokens = float(totals[0] / totals[1].clamp_min(1)), int(totals[1])
        improved = loss < self.best_loss
        if improved:
            self.best_loss, self.best_step, self.since_best = loss, step, 0
        else:
            self.since_best += 1
        return EvalResult(step, loss, tokens, improved)

    def saved(self, step: int) -> None:
        """A checkpoint of `step` is complete: record it as the best one when it is."""
        if step != self.best_step or self.run_dir is None or not self.rt.is_main:
            return
        from trainer.checkpoint.dcp import checkpoints_dir, step_name

        best = {"step": step, "eval_loss": self.best_loss,
                "checkpoint": str((checkpoints_dir(self.run_dir) / step_name(step)).relative_to(self.run_dir))}
        tmp = self.run_dir / f".{BEST_FILE}.tmp"
        tmp.write_text(json.dumps(best, indent=1) + "\n")
        os.replace(tmp, self.run_dir / BEST_FILE)

    def keep(self) -> tuple[int, ...]:
        """Checkpoint steps that pruning must keep."""
        return (self.best_step,) if self.best_step else ()

    def _rank_batches(self):
        """(micro-batch, real) pairs of this rank: as many for every rank; the filler batches train nothing."""
        rt, total = self.rt, len(self.micro_batches)
        per_rank = -(-total // rt.world_size)
        for k in range(per_rank):
            j = k * rt.world_size + rt.rank
            rows = self.micro_batches[j] if j < total else self.micro_batches[0]
            batch = self._collate(rows)
            if j >= total:
                batch["targets"].fill_(IGNORE_INDEX)
            yield batch, j < total

    def _collate(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        built = []
        for indices in rows:
            row = Row()
            for index in indices:
                row.add(self.dataset.samples[index])
            built.append(row)
        length = self.seq_len if self.packing else max(r.length for r in built)
        return collate(built, length, self.pad_id)

    def _forget_hook_state(self) -> None:
        step = self.hooks
        if step is None:
            return
        if step.tracker is not None:
            step.tracker.snapshot()  # expert counts of the eval forwards are not training load
        if step.balancer is not None:
            step.balancer.reset()
        if step.z_loss is not None:
            step.z_loss.pop()

    def _restore(self, resume_step: int) -> None:
        path = self.run_dir / BEST_FILE
        try:
            best = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if isinstance(best, dict) and 0 < int(best.get("step", 0)) <= resume_step:
            self.best_loss, self.best_step = float(best["eval_loss"]), int(best["step"])
            self.since_best = resume_step // self.every - self.best_step // self.every if self.every else 0


def _rows(dataset, seq_len: int, pad_id: int, packing: bool) -> list[list[int]]:
    """The validation set as rows of sample indices, packed like training data, in stored order, once."""
    loader = StatefulLoader(dataset, seq_len, 1, pad_id, packing, shuffle=False)
    rows = []
    while loader.epoch == 0 and loader.cursor < len(dataset):
        rows.append(loader.next_row_indices())
    return rows
