"""Schemathesis hooks for fuzzing the bridge's /openapi.json (loaded through SCHEMATHESIS_HOOKS).

The document states every rule JSON Schema can state. The rest (listed in
rest_bridge/openai_schemas/engine_rules.py, UNSTATED_RULES, and repeated in the routes'
descriptions) are relations between two fields, the syntax of embedded languages (regexes,
grammars, JSON schemas, Jinja) and facts of the served model. Schema-valid (positive) cases
are brought within those rules here before they are sent, so schemathesis' positive-data check
judges everything else; the edits keep each case schema-valid. Negative cases go out as
generated. The same edits keep each request's work small (a few tokens, a few choices).

Environment: PROTOSERVE_FUZZ_VOCAB_SIZE and PROTOSERVE_FUZZ_MAX_MODEL_LEN (the served model's),
PROTOSERVE_FUZZ_STATUS_LOG (optional: one "METHOD PATH STATUS" line per response).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import schemathesis
from schemathesis import GenerationMode

# Schemathesis loads this file by path: its sibling modules are importable from here on.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from openapi_fuzz_surfaces import within_messages_rules, within_responses_rules  # noqa: E402

VOCAB_SIZE = int(os.environ.get("PROTOSERVE_FUZZ_VOCAB_SIZE", "0"))
MAX_MODEL_LEN = int(os.environ.get("PROTOSERVE_FUZZ_MAX_MODEL_LEN", "0"))
STATUS_LOG = os.environ.get("PROTOSERVE_FUZZ_STATUS_LOG")

# Work per request: generated counts reach 2^31 - 1.
MAX_NEW_TOKENS, MAX_CHOICES, MAX_LOGPROBS, MAX_DIMENSIONS = 4, 2, 5, 8
# Prompts within the demo model's 256-token context (a character may be 4 byte tokens, and
# each message adds the template's own tokens).
MAX_TEXT_CHARS, MAX_MESSAGES, MAX_PROMPTS, MAX_PROMPT_IDS = 16, 4, 4, 32
INT64_MAX = 2**63 - 1
# A BERT pair's 3 special tokens plus one of text (the fuzz engine's cross-encoder).
PAIR_MIN_TOKENS = 4
# Fields written in another language (regex, grammar, JSON Schema, Jinja) or naming
# server-installed backends: random text is not a program, so positive cases leave them out
# (their own tests cover them).
_EMBEDDED_LANGUAGES = ("guided_json", "guided_regex", "guided_grammar", "guided_decoding_backend",
                       "guided_whitespace_pattern", "chat_template", "chat_template_kwargs")
_TOKEN_ID_LISTS = ("stop_token_ids", "allowed_token_ids", "tokens")


@schemathesis.hook
def before_call(ctx: Any, case: Any, **kwargs: Any) -> None:
    if case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE:
        return
    if not isinstance(case.body, dict):
        return
    path = case.operation.path
    if path == "/v1/responses":
        within_responses_rules(case.body)
    elif path.startswith("/v1/messages"):
        within_messages_rules(case.body)
    else:
        within_unstated_rules(case.body)
        _pairs_within_rules(case.body)


@schemathesis.hook
def after_call(ctx: Any, case: Any, response: Any) -> None:
    if STATUS_LOG:
        with open(STATUS_LOG, "a", encoding="utf-8") as log:
            log.write(f"{case.method} {case.operation.path} {response.status_code}\n")


def within_unstated_rules(body: dict[str, Any]) -> None:
    """Edit a schema-valid request body in place so it also keeps the rules the schema cannot
    state (see the module docstring)."""
    for name in _EMBEDDED_LANGUAGES:
        body.pop(name, None)
    _one_guided_kind(body)
    _small_work(body)
    _no_greedy_copies(body)
    _token_ids_in_vocabulary(body)
    if _is_number(body.get("seed")):
        # Numbers just past the int64 range compare equal to its ends in double precision,
        # so schema validators call them in range; they are not.
        body["seed"] = max(min(body["seed"], INT64_MAX), -INT64_MAX - 1)
    if isinstance(body.get("messages"), list):
        _messages_the_template_takes(body)
        body.pop("documents", None)  # the template renders them into the prompt too
    if isinstance(body.get("tools"), list):
        # The template renders each tool into the prompt (within --max-prompt-bytes); their
        # parameters are JSON schemas.
        body["tools"] = [
            {"type": "function", "function": {"name": tool["function"]["name"][:MAX_TEXT_CHARS]}}
            for tool in body["tools"][:MAX_MESSAGES]
            if isinstance(tool, dict) and isinstance(tool.get("function"), dict)
            and isinstance(tool["function"].get("name"), str)]
    if body.get("tool_choice") not in (None, "none", "required") or not body.get("tools"):
        # "auto" needs the server's tool parser; a named function must be one of the tools.
        body.pop("tool_choice", None)
    _cap(body, "dimensions", MAX_DIMENSIONS)
    _prompts_within_context(body)


def _one_guided_kind(body: dict[str, Any]) -> None:
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        body.pop("response_format")  # its schema is JSON Schema text
    elif isinstance(response_format, dict) and response_format.get("type") == "json_object":
        body.pop("guided_choice", None)


def _small_work(body: dict[str, Any]) -> None:
    if body.get("use_beam_search"):
        # Beam search takes temperature 0 and none of the sampling filters.
        body["use_beam_search"] = False
    for name in ("max_tokens", "max_completion_tokens", "min_tokens"):
        _cap(body, name, MAX_NEW_TOKENS)
    for name in ("logprobs", "top_logprobs", "prompt_logprobs"):
        _cap(body, name, MAX_LOGPROBS)
    _cap(body, "n", MAX_CHOICES)
    n = body["n"] if _is_number(body.get("n")) else 1
    if _is_number(body.get("best_of")):
        # best_of >= n; streaming asks for best_of == n.
        body["best_of"] = n if body.get("stream") else min(max(body["best_of"], n), MAX_CHOICES)
    if MAX_MODEL_LEN:
        _cap(body, "truncate_prompt_tokens", MAX_MODEL_LEN - 1)


def _cap(body: dict[str, Any], name: str, cap: int) -> None:
    if _is_number(body.get(name)):
        body[name] = min(body[name], cap)


def _no_greedy_copies(body: dict[str, Any]) -> None:
    greedy = body.get("temperature") == 0 or body.get("top_k") == 1
    if greedy:
        for name in ("n", "best_of"):
            if _is_number(body.get(name)):
                body[name] = 1


def _token_ids_in_vocabulary(body: dict[str, Any]) -> None:
    if not VOCAB_SIZE:
        return
    for name in _TOKEN_ID_LISTS:
        if isinstance(body.get(name), list):
            body[name] = _in_vocabulary(body[name])
    for name in ("prompt", "input"):
        value = body.get(name)
        if isinstance(value, list) and value and _is_number(value[0]):
            body[name] = _in_vocabulary(value)
        elif isinstance(value, list) and value and isinstance(value[0], list):
            body[name] = [_in_vocabulary(ids) for ids in value]
    if isinstance(body.get("logit_bias"), dict):
        body["logit_bias"] = {str(int(key) % VOCAB_SIZE) if key.isdigit() else key: bias
                              for key, bias in body["logit_bias"].items()}


def _in_vocabulary(token_ids: list[Any]) -> list[int]:
    # Integral floats are integers to the schema and the server alike.
    return [int(token) % VOCAB_SIZE if _is_number(token) else token for token in token_ids]


def _messages_the_template_takes(body: dict[str, Any]) -> None:
    """The demo model's ChatML template reads each message's text content."""
    for message in body["messages"]:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):
            text = [part["text"] for part in content
                    if isinstance(part, dict) and isinstance(part.get("text"), str)]
            message["content"] = "\n".join(text)
        elif not isinstance(content, str):
            message["content"] = ""
        message.pop("tool_calls", None)


def _prompts_within_context(body: dict[str, Any]) -> None:
    for name in ("prompt", "input"):
        value = body.get(name)
        if isinstance(value, str):
            body[name] = value[:MAX_TEXT_CHARS]
        elif isinstance(value, list):
            body[name] = [_shorter(item) for item in value[:MAX_PROMPTS]]
            if value and _is_number(value[0]):
                body[name] = value[:MAX_PROMPT_IDS]
    if isinstance(body.get("messages"), list):
        body["messages"] = body["messages"][:MAX_MESSAGES]
        for message in body["messages"]:
            for key in ("content", "role"):
                if not isinstance(message, dict):
                    break
                if isinstance(message.get(key), str):
                    message[key] = message[key][:MAX_TEXT_CHARS]


def _pairs_within_rules(body: dict[str, Any]) -> None:
    """Scoring bodies: short texts, one text_1 or as many as text_2, and truncation that
    leaves room beside a pair's special tokens ([CLS] a [SEP] b [SEP])."""
    for name in ("text_1", "text_2", "query", "documents"):
        value = body.get(name)
        if isinstance(value, str):
            body[name] = value[:MAX_TEXT_CHARS]
        elif isinstance(value, list):
            body[name] = [_shorter(item) for item in value[:MAX_PROMPTS]]
    first, second = body.get("text_1"), body.get("text_2")
    count_2 = len(second) if isinstance(second, list) else 1
    if isinstance(first, list) and len(first) not in (1, count_2):
        body["text_1"] = first[:1]
    if ("text_1" in body or "query" in body) and _is_number(body.get("truncate_prompt_tokens")):
        body["truncate_prompt_tokens"] = max(body["truncate_prompt_tokens"], PAIR_MIN_TOKENS)


def _shorter(item: Any) -> Any:
    if isinstance(item, str):
        return item[:MAX_TEXT_CHARS]
    if isinstance(item, list):
        return item[:MAX_PROMPT_IDS]
    return item


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
