"""Train the demo's byte-level BPE tokenizer and wrap it as a transformers tokenizer.

The training text ships with the package (`corpus.txt`), so the tokenizer is the same on every
machine. Byte-level BPE has all 256 bytes in its initial alphabet: any string encodes, and the
corpus' accented, Greek, CJK and emoji lines make multi-byte merges exist, so tokens that end
in the middle of a UTF-8 sequence occur in real output.
"""
from __future__ import annotations

from importlib import resources

from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
# Trainer special tokens take the first ids, in this order: BOS 0, EOS 1, im_start 2, im_end 3.
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN)

DEMO_VOCAB_SIZE = 2000


def corpus_text() -> str:
    """The packaged training text."""
    return resources.files("engine.demo").joinpath("corpus.txt").read_text(encoding="utf-8")


def chatml_template() -> str:
    """The packaged ChatML chat template (BOS, then `<|im_start|>role\\ncontent<|im_end|>\\n`)."""
    return resources.files("engine.demo").joinpath("chatml.jinja").read_text(encoding="utf-8")


def train_byte_level_bpe(text: str, vocab_size: int) -> RustTokenizer:
    """A byte-level BPE tokenizer trained on `text` whose encodings start with BOS.

    Training is deterministic for a given text and vocab size (the trainer breaks count ties
    by pair order), which keeps the demo's tokenizer.json byte-identical across builds.
    """
    tokenizer = RustTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # Only applied when the caller asks for special tokens (add_special_tokens=True).
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tokenizer


def to_transformers_tokenizer(
    tokenizer: RustTokenizer, *, chat_template: str | None, model_max_length: int
) -> PreTrainedTokenizerFast:
    """Wrap a trained tokenizer with its special-token roles and chat template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        chat_template=chat_template,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
