"""The reference side of every comparison: transformers itself, loaded from the same exported directory.

Greedy decoding and log-likelihoods computed here are what the served model must reproduce. The export is loaded
with the plain HF classes (`AutoModelForCausalLM`), never with the trainer's fast path, so a wrong export cannot
agree with itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError


@dataclass
class Generation:
    """One greedy continuation: generated token ids [N], their decoded text, and each token's logprob [N]."""

    token_ids: list[int]
    text: str
    token_logprobs: list[float]


class Reference:
    """transformers on the export: `greedy(prompt)`, `greedy_chat(messages)`, `loglikelihood(context, continuation)`."""

    def __init__(self, export_dir: str | Path, device: str = "auto", dtype: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        export_dir = Path(export_dir)
        if not (export_dir / "config.json").is_file():
            raise UserError(f"{export_dir} is not an exported checkpoint (no config.json)", "pass the directory that `moe export` wrote")
        self.tokenizer = AutoTokenizer.from_pretrained(export_dir)
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        if device == "auto" and torch.cuda.is_available():
            # Beside a server on the same GPUs: spread the layers over what each GPU has free, then host memory,
            # so a 30B export fits where one GPU next to vLLM could not hold it (accelerate's device_map).
            self.model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch_dtype, device_map="auto").eval()
            self.device = str(self.model.get_input_embeddings().weight.device)
        else:
            self.device = "cpu" if device == "auto" else device
            self.model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch_dtype).to(self.device).eval()

    def _generate(self, inputs: dict, max_new_tokens: int) -> Generation:
        import torch

        input_ids_1S = inputs["input_ids"].to(self.device)
        attention_mask = inputs.get("attention_mask")
        config = self.model.generation_config
        # Same settings as a server asked for temperature 0: the model's own generation config, sampling off.
        with torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids_1S,
                attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=config.eos_token_id,
                pad_token_id=config.pad_token_id if config.pad_token_id is not None else self.tokenizer.pad_token_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
        new_ids_N = out.sequences[0, input_ids_1S.shape[1] :]
        logprobs = [
            torch.log_softmax(step_logits_1V[0].float(), dim=-1)[token].item()
            for step_logits_1V, token in zip(out.logits, new_ids_N.tolist())
        ]
        text = self.tokenizer.decode(new_ids_N, skip_special_tokens=True)
        return Generation(token_ids=new_ids_N.tolist(), text=text, token_logprobs=logprobs)

    def greedy(self, prompt: str, max_new_tokens: int) -> Generation:
        """Greedy continuation of a raw prompt, tokenized exactly as /v1/completions servers do (special tokens on)."""
        return self._generate(self.tokenizer(prompt, return_tensors="pt"), max_new_tokens)

    def greedy_chat(self, messages: list[dict], max_new_tokens: int) -> Generation:
        """Greedy reply to `messages` through the export's chat template, as /v1/chat/completions renders it."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError("the export's tokenizer has no chat template", "serve with /v1/completions or export a chat template")
        inputs = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True, tokenize=True
        )
        return self._generate(inputs, max_new_tokens)

    def prefix_tokens(self, token_ids: list[int], text: str) -> int:
        """How many leading tokens of `token_ids` decode to a prefix of `text` (the first divergent token's index)."""
        count = 0
        for n in range(1, len(token_ids) + 1):
            if not text.startswith(self.tokenizer.decode(token_ids[:n], skip_special_tokens=True)):
                break
            count = n
        return count

    def loglikelihood(self, context: str, continuation: str) -> float:
        """Sum of log p(token) over the tokens of `context + continuation` that start at or after len(context).

        The split is by character offset of the whole string's tokenization, the same rule applied to a server's
        echoed `text_offset`, so both sides score the same tokens.
        """
        import torch

        full = context + continuation
        encoded = self.tokenizer(full, return_offsets_mapping=True, return_tensors="pt")
        offsets_S = [start for start, _ in encoded["offset_mapping"][0].tolist()]
        ids_1S = encoded["input_ids"].to(self.device)
        with torch.no_grad():
            logits_1SV = self.model(input_ids=ids_1S).logits.float()
        logprobs_SV = torch.log_softmax(logits_1SV[0, :-1], dim=-1)  # position s predicts token s+1
        total = 0.0
        for s in range(1, ids_1S.shape[1]):
            if offsets_S[s] >= len(context):
                total += logprobs_SV[s - 1, ids_1S[0, s]].item()
        return total
