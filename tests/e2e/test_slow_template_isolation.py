"""One client's runaway chat template costs that client alone: it renders off the event loop,
in a bounded worker, and ends in a 400 naming chat_template, while a concurrent short
completion finishes and /health answers 200 throughout."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import openai
import pytest
from engine_process import EngineProcess

pytestmark = pytest.mark.e2e
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def test_a_runaway_template_stalls_nobody_else(
    shared_server: Callable[..., EngineProcess],
) -> None:
    server = shared_server(role="all")
    client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0,
                           timeout=120)
    model = client.models.list().data[0].id
    slow: dict[str, object] = {}

    def runaway() -> None:
        try:
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                extra_body={"chat_template": NESTED_LOOPS})
        except openai.BadRequestError as error:
            slow["error"] = error.body
        slow["ended"] = time.monotonic()

    thread = threading.Thread(target=runaway)
    thread.start()
    try:
        time.sleep(0.5)  # let it start rendering (the ordering below is what is asserted)
        health = httpx.get(f"{server.http_url}/health", timeout=60)
        quick = client.completions.create(model=model, prompt="Hello", max_tokens=4,
                                          temperature=0)
        quick_ended = time.monotonic()
    finally:
        thread.join(timeout=120)
    assert health.status_code == 200
    assert quick.usage is not None and quick.usage.completion_tokens == 4
    assert slow["error"]["param"] == "chat_template", slow
    # The short request did not wait for the template's 5 s render bound.
    assert quick_ended < slow["ended"]
