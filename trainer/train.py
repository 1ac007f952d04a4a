"""The training loop: recipe in, checkpoints, metrics and a Hugging Face export out.

    recipe -> runtime (device, precision, seed) -> resume choice -> tokenizer, data (token cache, mixing, run
           length: `trainer.data.prepare`) -> layout/memory check
           -> model, parallelize, perf options -> AdamW + warmup/cosine -> resume state -> run dir
           -> steps (`trainer.step.TrainStep`), validation loss (`trainer.evaluate`) -> DCP checkpoints -> export

Everything a user can get wrong is checked before the run directory is touched, so a refused start leaves no
trace. SIGTERM/SIGUSR1 finish the current step, checkpoint and return (`TrainResult.preempted`); a second
signal stops at once (`trainer.preemption`). Nothing printed or saved carries a credential (`trainer.redact`).

The loop never waits for the device: each step is queued, then the previous step's values (loss, gradient norm,
expert load) are read from host copies queued with it, so the host stays one step ahead; the next micro-batches are
prefetched to the GPU meanwhile (`trainer.step`). Runs identically on one CPU and under torchrun (FSDP2/EP via
`trainer.parallel`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trainer.build import build_model, load_model_config, load_tokenizer
from trainer.checkpoint.dcp import load_checkpoint, save_checkpoint
from trainer.checkpoint.export import DTYPES, export_hf
from trainer.config import Recipe
from trainer.data import StatefulLoader
from trainer.data.budget import epoch_shape, run_steps
from trainer.data.prepare import prepare_data
from trainer.errors import UserError
from trainer.evaluate import Evaluator
from trainer.faults import fault_point
from trainer.loss import forward_loss_sum
from trainer.flops import PEAK_TFLOPS
from trainer.metrics import ExpertLoadTracker, MetricsWriter, flops_per_token, imbalance, peak_memory_gib
from trainer.moe.balance import balancer_for
from trainer.moe.z_loss import z_loss_for
from trainer.optim import build_optimizer, build_scheduler
from trainer.parallel.resume import check_resume_world_size
from trainer.perf import apply_optimizations, disable_compile, resolve_perf
from trainer.preemption import PreemptionGuard
from trainer.profiling import StepProfiler
from trainer.redact import redact
from trainer.lora import run as lora_run
from trainer.run_dir import MODEL_FILES, create_run_dir, resolve_resume, save_model_files, saved_recipe
from trainer.runtime import Runtime, accelerator_memory_gib, parallelize, setup_runtime
from trainer.step import Prefetcher, TrainStep, step_stream
from trainer.tracking import check_wandb, open_wandb


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: list[float]  # per optimizer step trained by this call
    export_dir: Path | None
    model: torch.nn.Module
    tokenizer: object
    preempted: str = ""  # the signal's name (SIGTERM, SIGUSR1) when the run stopped early at a checkpoint
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss) of this call
    stopped_early: bool = False  # train.early_stop_patience evaluations without a new best


def train(recipe: Recipe, progress: bool = True) -> TrainResult:
    rt = setup_runtime(recipe)
    recipe.output.export_dtype = str(export_dtype(recipe, rt)).removeprefix("torch.")  # recorded in checkpoints
    # Everything a user can get wrong is checked before the run directory is touched.
    resume_from = resolve_resume(recipe)
    if resume_from:
        check_resume_world_size(resume_from, rt.world_size)  # any mesh layout, but the same number of processes
    check_wandb(recipe.tracking)
    tokenizer = load_tokenizer(recipe.model)
    data, micro_batch = recipe.data, recipe.train.micro_batch_size
    prepared = prepare_data(data, tokenizer, recipe.train.seed, rt.any_rank, int(os.environ.get("LOCAL_RANK", "0")))
    dataset = prepared.train
    shape = epoch_shape(dataset, data.seq_len, micro_batch, data.packing, data.shuffle, recipe.train.seed,
                        micro_batch * recipe.train.grad_accum_steps * rt.world_size)
    max_steps = run_steps(recipe.train, shape)
    _say(rt, f"data: {prepared.summary()}; {max_steps} steps cover {shape.epochs_of(max_steps):.2f} epochs "
             f"({shape.rows} rows of up to {data.seq_len} tokens per epoch)")
    check_layout(recipe, rt)
    # A LoRA base is loaded whole, then adapted, then sharded (PEFT injects its layers into plain modules); a
    # replicated layout holds the whole model on every rank.
    sharded_load = rt.world_size > 1 and not recipe.lora.enabled and recipe.parallel.layout == "fsdp"
    model = build_model(recipe.model, rt.param_dtype, rt.device, recipe.parallel if sharded_load else None,
                        packing=data.packing)
    if recipe.lora.enabled:  # a random-init base is the one the run saved (trainer.lora.run); the rest is frozen
        saved_base = Path(recipe.output.dir) / MODEL_FILES if resume_from and recipe.model.from_config else None
        model = lora_run.adapted(model, recipe.lora, saved_base)
    model = parallelize(model, recipe.parallel, rt)
    perf = resolve_perf(recipe.perf, rt.device, rt.world_size, adapters=recipe.lora.enabled)
    # the expert-load hooks exist before torch.compile traces the layers, so the compiled layers count too; CUDA-graph
    # layers trace them in (a graph break there splits every layer's graph)
    tracker = ExpertLoadTracker(model, recomputes=recipe.parallel.activation_checkpointing != "none",
                                traced=perf.compile == "layers-graphs")
    apply_optimizations(model, perf)

    def new_loader() -> StatefulLoader:
        return StatefulLoader(dataset, data.seq_len, micro_batch, tokenizer.pad_token_id,
                              data.packing, data.shuffle, recipe.train.seed, rt.rank, rt.world_size)

    if perf.compile != "off":
        perf.notes.append(_warm_compiled_layers(model, next(new_loader()), rt, perf.fused_ce))
    loader = Prefetcher(new_loader(), rt.device, recipe.train.grad_accum_steps, perf.prefetch)
    optimizer = build_optimizer(model, recipe.optim, perf)
    scheduler = build_scheduler(optimizer, recipe.optim, max_steps)
    for note in perf.notes:
        _say(rt, f"perf: {note}")
    noted = len(perf.notes)
    step = load_checkpoint(resume_from, model, optimizer, scheduler, loader) if resume_from else 0
    run_dir = create_run_dir(recipe, fresh=resume_from is None, is_main=rt.is_main)
    if resume_from:
        _say(rt, f"resumed from {resume_from} at step {step}")
    if rt.is_main:
        save_model_files(run_dir, model, tokenizer)
    if recipe.lora.enabled and recipe.model.from_config and not resume_from:
        lora_run.save_base(model, run_dir / MODEL_FILES)  # every rank: the sharded base is gathered to rank 0

    def save() -> None:
        optimizer.flush()  # held-back (deferred) updates belong to the saved step
        save_checkpoint(run_dir, step, model, optimizer, scheduler, loader, recipe.checkpoint.keep_last,
                        saved_recipe(recipe), rt.world_size, keep=evaluator.keep() if evaluator else ())
        if evaluator is not None:
            evaluator.saved(step)

    tracker.snapshot()  # drop what the compile warm-up counted
    writer = MetricsWriter(run_dir, step, open_wandb(recipe.tracking, run_dir, dict(saved_recipe(recipe)))
                           ) if rt.is_main else None
    train_step = TrainStep(model, optimizer, scheduler, rt, perf, recipe.optim.max_grad_norm, tracker,
                           balancer_for(model, recipe.moe.aux_free_bias_rate),
                           z_loss_for(model, recipe.moe.router_z_loss_coef))
    for note in perf.notes[noted:]:  # what the step settled (the gradient norm's moment)
        _say(rt, f"perf: {note}")
    evaluator = None if prepared.eval is None or not recipe.train.eval_every else Evaluator(
        model, prepared.eval, rt, seq_len=data.seq_len, micro_batch_size=micro_batch, pad_id=tokenizer.pad_token_id,
        packing=data.packing, fused_ce=perf.fused_ce, every=recipe.train.eval_every,
        patience=recipe.train.early_stop_patience, run_dir=run_dir, resume_step=step, hooks=train_step)
    flops_tok = flops_per_token(model, data.seq_len)
    bar = tqdm(total=max_steps, initial=step, disable=not (progress and rt.is_main), desc="train")
    losses, eval_losses, saved_step, preempted, stopped_early = [], [], step, "", False
    clock = {"last": time.perf_counter(), "last_out": None, "nonfinite_in_a_row": 0}

    def finish(done_step: int, out) -> None:
        """Read a queued step's values (after the next one is queued, so the device never waits), log them."""
        values = out.fetch()
        now = time.perf_counter()
        device_seconds = out.seconds_since(clock["last_out"])
        seconds = device_seconds if device_seconds is not None else now - clock["last"]
        clock["last"], clock["last_out"] = now, out
        nonfinite = values["skipped"]
        record = _record(done_step, values, seconds, flops_tok, rt, tracker, skipped=nonfinite,
                         applied=optimizer.in_backward)
        losses.append(values["loss"])
        if writer is not None:
            writer.write(record)
        clock["nonfinite_in_a_row"] = clock["nonfinite_in_a_row"] + 1 if nonfinite else 0
        if clock["nonfinite_in_a_row"] >= recipe.train.nonfinite_max_consecutive:
            raise UserError(f"loss or gradient was NaN/inf for {clock['nonfinite_in_a_row']} steps in a row "
                            f"(step {done_step})", "lower optim.lr, keep optim.max_grad_norm > 0, or check the data")
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if bar.disable and rt.is_main and done_step % recipe.train.log_every == 0:
            _say(rt, _log_line(record))

    with PreemptionGuard() as guard, step_stream(perf, rt.device):
        pending = None
        while step < max_steps:
            with StepProfiler(run_dir, rt.is_main and step + 1 == recipe.train.profile_step):
                out = train_step(next(loader))
            step += 1
            if pending is not None:
                finish(*pending)
            pending = (step, out)
            checkpoint_due = recipe.checkpoint.every_steps and step % recipe.checkpoint.every_steps == 0
            eval_due = evaluator is not None and evaluator.due(step, max_steps)
            # on the CPU the step ran as it was queued: nothing to overlap, and each step's time is its own
            if checkpoint_due or eval_due or step == max_steps or rt.device.type != "cuda":
                finish(*pending)
                pending = None
            if eval_due:
                optimizer.flush()  # held-back (deferred) updates belong to the evaluated weights
                checkpoint_due = _evaluate(evaluator, step, writer, rt, eval_losses) or checkpoint_due
            if checkpoint_due:
                save()
                saved_step = step
                fault_point("MOE_FAULT_HANG_AFTER_CHECKPOINT", step, f"hanging after checkpoint {step}")
            fault_point("MOE_FAULT_PAUSE_AFTER_STEP", step, f"paused after step {step}",
                        until=lambda: guard.received is not None)
            if guard.should_stop(rt.any_rank):
                if pending is not None:
                    finish(*pending)
                    pending = None
                preempted = guard.signal_name or "a signal on another rank"
                break
            if evaluator is not None and evaluator.should_stop:
                stopped_early = True
                _say(rt, f"early stop at step {step}: no better eval loss in {evaluator.patience} evaluations "
                         f"(best {evaluator.best_loss:.4f} at step {evaluator.best_step})")
                break
        bar.close()
        if saved_step != step and (recipe.checkpoint.save_final or preempted):
            save()
        if preempted:
            _say(rt, f"stopped by {preempted} at step {step}: checkpoint saved; run the same command to resume")
        export_dir = None
        if recipe.output.export and not preempted:
            optimizer.flush()
            # The start-up check refused an output.dir holding another run's export, so this one is ours to replace.
            if recipe.lora.enabled:  # export-adapter/ (PEFT) and export/ (merged)
                export_dir = lora_run.export_lora(model, tokenizer, run_dir / "export", export_dtype(recipe, rt),
                                                  overwrite=True, base_model=lora_run.base_model_name(recipe.model))
            else:
                export_dir = export_hf(model, tokenizer, run_dir / "export", export_dtype(recipe, rt), overwrite=True)
            _say(rt, f"exported a Hugging Face checkpoint to {export_dir}")
    if writer is not None:
        writer.close()
        _plots(run_dir, tracker)
    tracker.remove()
    for hooks in (train_step.balancer, train_step.z_loss):
        if hooks is not None:
            hooks.remove()
    return TrainResult(run_dir, step, losses, export_dir, model, tokenizer, preempted, eval_losses, stopped_early)


def _evaluate(evaluator: Evaluator, step: int, writer, rt: Runtime, eval_losses: list) -> bool:
    """The validation loss now, logged; True when it is a new best (that step is then checkpointed)."""
    result = evaluator.run(step)
    eval_losses.append((step, result.loss))
    if writer is not None:
        writer.write(result.record(evaluator.best_loss, evaluator.best_step))
    _say(rt, f"step {step}: eval loss {result.loss:.4f}" + (" (best)" if result.improved else ""))
    return result.improved


def _warm_compiled_layers(model, first_batch: dict, rt: Runtime, fused_ce: bool) -> str:
    """Compile happens at the first call: run forward + backward once on the first batch (from a loader of its own,
    so the training data order is untouched) and drop the gradients. A failure falls back to eager in a single
    process; with several processes the error stops the run (the ranks must not disagree about what they run)."""
    batch = {k: v.to(rt.device) for k, v in first_batch.items()}
    try:
        with rt.autocast():
            token_loss_sum, _ = forward_loss_sum(model, batch, fused_ce)
        token_loss_sum.backward()
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        if rt.world_size > 1:
            raise UserError(f"torch.compile of the decoder layers failed at the first batch ({reason})",
                            "set perf.compile=off") from err
        disable_compile(model)
        return f"torch.compile failed at the first batch ({reason}): eager instead"
    finally:
        model.zero_grad(set_to_none=True)
    return "decoder layers compiled (first batch run once before training)"


def check_layout(recipe: Recipe, rt: Runtime) -> None:
    """Mesh sizes against the world size and the expert count, and on GPUs the memory plan (`trainer.planner`),
    from the model config alone: a layout that cannot run is refused before any weight is loaded."""
    from trainer.models.base import num_experts
    from trainer.parallel.config import ParallelConfig
    from trainer.parallel.mesh import mesh_sizes

    config = load_model_config(recipe.model)
    parallel = recipe.parallel
    if rt.world_size == 1 and parallel.ep_size > 1:
        raise UserError(f"parallel.ep_size={parallel.ep_size} needs as many processes, this is one",
                        "launch with torchrun --nproc-per-node N or set parallel.ep_size=1")
    mesh_sizes(ParallelConfig.from_any(parallel), rt.world_size, num_experts(config))
    if recipe.lora.enabled and rt.world_size > 1:
        from trainer.lora.fsdp import check_sharded_lora

        check_sharded_lora(rt.param_dtype)
    memory_gib = accelerator_memory_gib(rt)
    if memory_gib is not None and parallel.check_memory:
        from trainer.planner import check_fits

        # a replica holds what one process holds (its AdamW slice is smaller: the one-process plan bounds it)
        check_fits(recipe, config, rt.world_size if parallel.layout == "fsdp" else 1, memory_gib)


def _record(step: int, values: dict, seconds: float, flops_tok: float, rt: Runtime, tracker, skipped: bool,
            applied: bool) -> dict:
    tokens_per_s = values["tokens"] / max(seconds, 1e-9)
    tflops = flops_tok * tokens_per_s / 1e12
    record = {
        "step": step, "loss": values["loss"], "lr": values["lr"], "grad_norm": values["grad_norm"],
        "tokens": values["tokens"], "tokens_per_s": tokens_per_s, "tflops": tflops,
        "mfu": tflops / (PEAK_TFLOPS * rt.world_size), "peak_memory_gib": peak_memory_gib(), "step_seconds": seconds,
    }
    counts_LE = values["expert_counts_LE"]
    if counts_LE is not None:
        tracker.add(counts_LE)
        per_layer = imbalance(counts_LE.float())
        record["expert_load_max_over_mean"] = max(per_layer)
        record["expert_load_per_layer"] = [round(x, 4) for x in per_layer]
    if skipped:
        # an in-backward optimizer has applied the update already: the step is reported, not skipped
        record["nonfinite" if applied else "skipped"] = True
    return record


def _log_line(record: dict) -> str:
    norm = "" if record["grad_norm"] is None else f"grad_norm {record['grad_norm']:.3f} "
    return (f"step {record['step']}: loss {record['loss']:.4f} lr {record['lr']:.2e} "
            f"{norm}{record['tokens_per_s']:.0f} tok/s")


def export_dtype(recipe: Recipe, rt: Runtime) -> torch.dtype:
    """output.export_dtype; auto = float32 when training in fp32, else bfloat16."""
    name = recipe.output.export_dtype
    if name == "auto":
        name = "float32" if rt.precision == "fp32" else "bfloat16"
    return DTYPES[name]


def _plots(run_dir: Path, tracker: ExpertLoadTracker) -> None:
    from trainer.metrics import read_metrics
    from trainer.plots import plot_expert_load, plot_loss

    plot_loss(read_metrics(run_dir), run_dir / "loss.png")
    plot_expert_load(tracker.total_LE, run_dir / "expert_load.png")


def _say(rt: Runtime, message: str) -> None:
    if rt.is_main:
        print(redact(message), flush=True)
