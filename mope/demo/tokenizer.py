"""A byte-level BPE tokenizer trained on the demo corpus, saved as a Hugging Face tokenizer directory."""

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

USER, ASSISTANT = "<|user|>", "<|assistant|>"
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, USER, ASSISTANT)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of `vocab_size` tokens (specials included) on `texts`; save it to `out_dir`.

    The chat markers and EOS are single special tokens; no token is added automatically on encode
    (the prompt already starts with <|user|>), and every training response ends with EOS.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        minimum = 256 + len(SPECIAL_TOKENS)
        raise ValueError(f"vocab_size must be at least {minimum} (bytes + specials), got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    tokenizer.add_special_tokens({"additional_special_tokens": [USER, ASSISTANT]})
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
