"""Regenerate the embedded default: the SFT set, the byte-level BPE tokenizer and the tiny Qwen3-MoE config.

Everything the CPU demo needs ships in the repository; this script is how it was made, so anyone can rebuild it:

    python -m trainer.assets.build_assets

Outputs (all deterministic for a given `tokenizers` version):
  trainer/assets/data/sft.jsonl           a few hundred templated chat examples (arithmetic, capitals, reversal, ...)
  trainer/assets/tokenizer/               a ~1k-token byte-level BPE with a ChatML (<|im_start|>/<|im_end|>) template
  trainer/assets/tiny-qwen3-moe/config.json  a 2-layer, 8-expert top-2 Qwen3-MoE whose vocab matches the tokenizer
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parent
SEED = 1234
NUM_EXAMPLES = 480
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, the format Qwen models use; `add_generation_prompt` opens the assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Egypt": "Cairo", "Kenya": "Nairobi", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara",
    "Peru": "Lima", "Chile": "Santiago", "Austria": "Vienna", "Ireland": "Dublin", "Denmark": "Copenhagen",
    "Russia": "Moscow", "Australia": "Canberra", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Cuba": "Havana",
}
WORDS = [
    "apple", "river", "planet", "music", "garden", "window", "silver", "forest", "candle", "rocket", "pencil",
    "dragon", "butter", "winter", "summer", "bridge", "island", "tiger", "orange", "yellow", "castle", "mirror",
    "violin", "coffee", "jungle", "marble", "pepper", "rabbit", "ticket", "wizard", "expert", "router", "tensor",
]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer briefly.", "You are a precise tutor."]


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    op = rng.choice(["+", "-", "*"])
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    question = rng.choice(["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}."])
    return question.format(a=a, op=op, b=b), f"{a} {op} {b} = {value}."


def _capital(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(CAPITALS))
    question = rng.choice(["What is the capital of {c}?", "Name the capital city of {c}.", "Capital of {c}?"])
    return question.format(c=country), f"The capital of {country} is {CAPITALS[country]}."


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"Reverse the word '{word}'.", f"'{word}' reversed is '{word[::-1]}'."


def _uppercase(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"Write '{word}' in capital letters.", f"{word.upper()}"


def _count_letters(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"How many letters are in the word '{word}'?", f"The word '{word}' has {len(word)} letters."


TASKS = [_arithmetic, _capital, _reverse, _uppercase, _count_letters]


def build_examples(num: int = NUM_EXAMPLES, seed: int = SEED) -> list[dict]:
    """Templated chat examples: `{"messages": [{"role", "content"}, ...]}`, some with a system turn, some two-turn."""
    rng = random.Random(seed)
    examples = []
    for i in range(num):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _ in range(2 if rng.random() < 0.15 else 1):
            question, answer = rng.choice(TASKS)(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        examples.append({"messages": messages})
    return examples


def build_tokenizer(texts: list[str], out_dir: Path) -> int:
    """Train a byte-level BPE on `texts`, save it as a Hugging Face tokenizer directory; returns the vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"], chat_template=CHAT_TEMPLATE, model_max_length=4096,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    # Also keep the template inside tokenizer_config.json, where consumers that predate chat_template.jinja look.
    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return len(fast)


def build_tiny_config(vocab_size: int, eos_id: int, pad_id: int, out_dir: Path) -> None:
    """A real Qwen3-MoE config, shrunk: 2 layers, hidden 64, 8 experts top-2 (tiny enough to train on 2 CPU cores)."""
    config = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "dtype": "float32",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    examples = build_examples()
    data_dir = ASSETS / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "sft.jsonl", "w") as f:
        for example in examples:
            f.write(json.dumps(example) + "\n")

    # The tokenizer learns from the rendered conversations plus the shipped prose, so it has general English too.
    texts = [m["content"] for e in examples for m in e["messages"]]
    texts += [line for line in (ASSETS / "corpus.txt").read_text().splitlines() if line.strip()]
    texts += ["system\n", "user\n", "assistant\n"] * 100  # the role names the chat template writes
    vocab_size = build_tokenizer(texts, ASSETS / "tokenizer")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer"))
    build_tiny_config(vocab_size, tokenizer.eos_token_id, tokenizer.pad_token_id, ASSETS / "tiny-qwen3-moe")
    print(f"wrote {len(examples)} examples, tokenizer with {vocab_size} tokens, tiny-qwen3-moe config")


if __name__ == "__main__":
    main()
