"""Request-supplied chat templates render in a worker process bounded in time and memory:
a runaway template is an error naming chat_template, the worker is replaced, and the next
render works; ordinary templates render as in-process."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import InvalidRequestError
from engine.tokenizer import Tokenizer
from engine.tokenizer.chat_template import render_chat_template
from engine.tokenizer.template_worker import TemplateWorker

MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
SIMPLE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
# Doubles a string 40 times: 1 TB if nothing stops it.
DOUBLING = ("{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
            "{% endfor %}{{ ns.s|length }}")


def _arguments(source: str) -> dict:
    return dict(source=source, messages=MESSAGES, add_generation_prompt=True,
                continue_final_message=False, tools=None, documents=None, variables={},
                content_format="string")


@pytest.fixture(scope="module")
def worker():
    worker = TemplateWorker(timeout_s=1.0)
    yield worker
    worker.close()


def test_renders_what_the_in_process_renderer_renders(worker: TemplateWorker) -> None:
    assert worker.render(**_arguments(SIMPLE)) == render_chat_template(**_arguments(SIMPLE))


@pytest.mark.parametrize("source, reasons", [
    (NESTED_LOOPS, ("did not finish rendering",)),
    # Which bound stops it first depends on how fast this machine fills memory.
    (DOUBLING, ("more memory", "did not finish rendering")),
    ("{% for i in range(20000) %}{{ 'x' * 1000 }}{% endfor %}", ("characters; at most",)),
])
def test_runaway_templates_are_refused_and_the_worker_recovers(
    worker: TemplateWorker, source: str, reasons: tuple[str, ...]
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        worker.render(**_arguments(source))
    assert caught.value.field == "chat_template"
    assert any(reason in caught.value.message for reason in reasons), caught.value.message
    assert worker.render(**_arguments(SIMPLE)) == "<user>hi<assistant>yo"


def test_template_errors_keep_their_field(worker: TemplateWorker) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        worker.render(**_arguments("{{ raise_exception('no tools here') }}"))
    assert caught.value.field == "messages" and "no tools here" in caught.value.message


def test_the_tokenizer_sends_only_request_templates_to_the_worker(tiny_llama_dir: Path) -> None:
    tokenizer = Tokenizer.load(str(tiny_llama_dir))
    # The model's own template renders in-process (no worker process is started for it).
    tokenizer.render_chat(MESSAGES)
    assert tokenizer._template_worker._process is None
    assert tokenizer.render_chat(MESSAGES, chat_template=SIMPLE).startswith("<user>hi")
    assert tokenizer._template_worker._process is not None
    with pytest.raises(InvalidRequestError) as caught:
        tokenizer.render_chat(MESSAGES, chat_template=NESTED_LOOPS)
    assert caught.value.field == "chat_template"
    tokenizer._template_worker.close()
