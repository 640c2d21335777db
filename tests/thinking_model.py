"""A tiny random-weight model whose tokenizer has `<think>` and `</think>` as single added
(non-special) tokens, as Qwen3's and DeepSeek-R1's do, and a ChatML template that opens a
think block in the generation prompt, or closes an empty one with
`chat_template_kwargs={"enable_thinking": false}` (Qwen3's switch)."""
from __future__ import annotations

from pathlib import Path

from model_factory import FACTORY_VOCAB_SIZE, build_tiny_model
from transformers import AutoTokenizer

THINK_START, THINK_END = "<think>", "</think>"
THINKING_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)


def build_thinking_model(path: Path) -> Path:
    """The factory's tiny Llama with the two think tokens appended to its vocabulary."""
    build_tiny_model(path, vocab_size=FACTORY_VOCAB_SIZE + 2, chat_template=THINKING_TEMPLATE)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_tokens([THINK_START, THINK_END])
    assert len(tokenizer) == FACTORY_VOCAB_SIZE + 2
    tokenizer.save_pretrained(path)
    return path


def think_token_ids(path: Path) -> tuple[int, int]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    start, end = tokenizer.convert_tokens_to_ids([THINK_START, THINK_END])
    return start, end
