"""Router z-loss: collected from the fused routers in the forward only, equal to the formula on HF's router logits."""

from __future__ import annotations

import torch

import tiny_configs
from trainer.config import load_recipe
from trainer.models import MoEAutoModelForCausalLM
from trainer.moe.router import router_z_loss
from trainer.moe.z_loss import z_loss_for
from trainer.train import train


def test_z_loss_equals_the_formula_on_the_router_logits_transformers_records():
    torch.manual_seed(0)
    model = MoEAutoModelForCausalLM.from_config(tiny_configs.qwen3_moe())
    collector = z_loss_for(model, coef=0.5)
    ids = torch.randint(0, tiny_configs.VOCAB, (2, 16))
    outputs = model(ids, output_router_logits=True)
    torch.testing.assert_close(collector.pop(), 0.5 * router_z_loss(outputs.router_logits))
    assert collector.pop() is None  # popped once per forward


def test_activation_checkpoint_recompute_does_not_collect_twice():
    torch.manual_seed(0)
    model = MoEAutoModelForCausalLM.from_config(tiny_configs.qwen3_moe()).train()
    model.gradient_checkpointing_enable()
    collector = z_loss_for(model, coef=1.0)
    ids = torch.randint(0, tiny_configs.VOCAB, (2, 16))
    loss = model(ids, labels=ids).loss
    collected = len(collector._logits)
    loss.backward()
    assert collected == model.config.num_hidden_layers == len(collector._logits)


def test_training_with_z_loss_changes_the_router_update_only(tmp_path):
    fast = ["data.seq_len=64", "train.micro_batch_size=2", "train.max_steps=2", "output.export=false", "optim.lr=1e-2"]
    runs = {}
    for coef in (0.0, 0.5):
        recipe = load_recipe("tiny-moe", [*fast, f"moe.router_z_loss_coef={coef}", f"output.dir={tmp_path / str(coef)}"])
        runs[coef] = train(recipe, progress=False)
    assert runs[0.0].losses[0] == runs[0.5].losses[0]  # the logged loss is the token cross-entropy
    router = "model.layers.0.mlp.gate.weight"
    a, b = (dict(r.model.named_parameters())[router] for r in runs.values())
    assert not torch.equal(a, b)
