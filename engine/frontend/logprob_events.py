"""Engine logprobs (token ids) -> event logprobs with token texts, on the asyncio side."""
from __future__ import annotations

from collections.abc import Sequence

from engine.generation import PositionLogprobs, TokenLogprob
from engine.core.outputs import TokenLogprobs
from engine.tokenizer import Tokenizer


def to_position_logprobs(entry: TokenLogprobs, tokenizer: Tokenizer) -> PositionLogprobs:
    """Each token's text is its own decode, special tokens kept, as OpenAI reports tokens."""
    ids = [entry.token_id, *entry.top_token_ids]
    texts = [tokenizer.decode([token_id], skip_special_tokens=False) for token_id in ids]
    chosen = TokenLogprob(entry.token_id, entry.logprob, entry.rank, texts[0])
    top = [
        TokenLogprob(token_id, logprob, rank, text)
        for rank, (token_id, logprob, text) in enumerate(
            zip(entry.top_token_ids, entry.top_logprobs, texts[1:]), start=1
        )
    ]
    return PositionLogprobs(chosen, top)


def to_prompt_logprobs(
    entries: Sequence[TokenLogprobs | None], tokenizer: Tokenizer
) -> list[PositionLogprobs | None]:
    return [None if e is None else to_position_logprobs(e, tokenizer) for e in entries]
