"""A tiny random-weight export (Qwen3-MoE family + byte-level BPE tokenizer) for smoke-testing the serving side.

`python -m eval tiny-export DIR` writes one in a second, so a serving image, the compose chain or the validator
can be exercised without a training run or any download. Uses the trainer's shipped tokenizer when present
(trainer/assets/tokenizer), else trains a small byte-level BPE on the shipped eval text.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).parent / "data"
SHIPPED_TOKENIZER = Path(__file__).resolve().parent.parent / "trainer" / "assets" / "tokenizer"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    lines = []
    for path in sorted(DATA.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            lines.extend([row.get("prompt", ""), row.get("question", ""), *row.get("choices", [])])
    return [line for line in lines if line] * 4


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer (round-trips any text) with <|endoftext|>, chat markers and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if (SHIPPED_TOKENIZER / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token=None
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def write_tiny_export(out_dir: str | Path, seed: int = 0) -> Path:
    """Write config.json + model.safetensors + tokenizer files of a 2-layer, 4-expert Qwen3-MoE to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Wider logits than the default init keep greedy picks far from ties, so parity is about weights, not noise.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
