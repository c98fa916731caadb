"""Train the demo's small Llama models with plain transformers + torch (training is not the engine's job)."""

import math
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

IGNORE = -100


def llama_config(tokenizer: PreTrainedTokenizerBase, hidden: int, layers: int, heads: int) -> LlamaConfig:
    """A small Llama config over the tokenizer's vocabulary (intermediate = 4 * hidden, untied head)."""
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def encode(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]], loss_on_prompt: bool
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each (prompt, response) pair: prompt + response + EOS; the prompt's
    labels are masked unless `loss_on_prompt` (the base LM also learns what instructions look like)."""
    encoded = []
    for prompt, response in pairs:
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        response_ids = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
        labels = (prompt_ids if loss_on_prompt else [IGNORE] * len(prompt_ids)) + response_ids
        encoded.append((prompt_ids + response_ids, labels))
    return encoded


def _batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def train_causal_lm(
    model: LlamaForCausalLM,
    data: list[tuple[list[int], list[int]]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    pad_id: int,
    desc: str | None = None,
) -> list[float]:
    """AdamW with a short warm-up and cosine decay over `steps` random batches; returns the step losses.
    With `desc`, a progress bar of that name shows the running loss."""
    if steps < 1 or batch_size < 1 or not data:
        raise ValueError(f"need steps, batch_size >= 1 and data: got {steps}, {batch_size}, {len(data)} rows")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=desc is None, leave=False)
    for _ in bar:
        loss = model(**_batch(rng.sample(data, min(batch_size, len(data))), pad_id)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses


def save_checkpoint(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> None:
    """An ordinary HF checkpoint directory: config.json, model.safetensors and the tokenizer files."""
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
