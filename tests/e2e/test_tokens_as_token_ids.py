"""engine-serve --return-tokens-as-token-ids, through the OpenAI SDK against a real engine:
logprob tokens are `token_id:N` on completions and chat unless a request opts out."""
from __future__ import annotations

from collections.abc import Callable

import openai
import pytest
from engine_process import EngineProcess

pytestmark = pytest.mark.e2e


def test_logprob_tokens_are_token_ids(shared_server: Callable[..., EngineProcess]) -> None:
    server = shared_server("--return-tokens-as-token-ids", role="all")
    client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    completion = client.completions.create(model=model, prompt="Hello", max_tokens=3,
                                           temperature=0, logprobs=1)
    tokens = completion.choices[0].logprobs.tokens
    assert len(tokens) == 3 and all(t.startswith("token_id:") for t in tokens)
    assert all(key.startswith("token_id:")
               for top in completion.choices[0].logprobs.top_logprobs for key in top)
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0,
        logprobs=True, top_logprobs=1)
    assert all(c.token.startswith("token_id:") for c in chat.choices[0].logprobs.content)
    opted_out = client.completions.create(model=model, prompt="Hello", max_tokens=3,
                                          temperature=0, logprobs=0,
                                          extra_body={"return_tokens_as_token_ids": False})
    assert not any(t.startswith("token_id:") for t in opted_out.choices[0].logprobs.tokens)
