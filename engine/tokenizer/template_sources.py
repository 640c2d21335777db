"""Where a chat template comes from: the model directory, the server flag, or the request.

Precedence for one request: the request's `chat_template` (template text, or the name of one of
the model's named templates), then the server's `--chat-template`, then the model's own
default (`tool_use` instead when the request has tools and the model names one).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import jinja2

from engine.errors import InvalidRequestError, ModelLoadError
from engine.tokenizer.template_sandbox import compile_chat_template

DEFAULT_TEMPLATE_NAME = "default"
TOOL_USE_TEMPLATE_NAME = "tool_use"
TEMPLATE_FILE = "chat_template.jinja"
NAMED_TEMPLATES_DIR = "additional_chat_templates"
LEGACY_TEMPLATE_JSON = "chat_template.json"


def read_model_chat_templates(directory: Path) -> dict[str, str]:
    """The model's templates by name ("default" for the unnamed one); {} when it has none.

    Files win over tokenizer_config.json, as in transformers: `chat_template.jinja` and
    `additional_chat_templates/*.jinja`; else tokenizer_config.json's `chat_template`, a string
    or a list of {name, template}; else a legacy `chat_template.json`.
    """
    templates: dict[str, str] = {}
    template_file = directory / TEMPLATE_FILE
    if template_file.is_file():
        templates[DEFAULT_TEMPLATE_NAME] = template_file.read_text(encoding="utf-8")
    named_dir = directory / NAMED_TEMPLATES_DIR
    if named_dir.is_dir():
        for path in sorted(named_dir.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if templates:
        return templates
    for config_name in ("tokenizer_config.json", LEGACY_TEMPLATE_JSON):
        found = _templates_in_json(directory / config_name)
        if found:
            return found
    return {}


def load_server_chat_template(value: str) -> str:
    """The `--chat-template` value as template text: a file's contents, or the text itself.

    Compiled here so that a broken template stops the server at start-up, not at a request.
    """
    path = Path(value).expanduser()
    looks_like_template = "{{" in value or "{%" in value
    if not looks_like_template:
        if not path.is_file():
            raise ModelLoadError(f"--chat-template: no such file: {value}")
        value = path.read_text(encoding="utf-8")
    try:
        compile_chat_template(value)
    except jinja2.TemplateSyntaxError as error:
        raise ModelLoadError(
            f"--chat-template does not compile: {error.message} (line {error.lineno})"
        ) from None
    return value


def select_chat_template(
    request_template: str | None,
    server_template: str | None,
    model_templates: Mapping[str, str],
    *,
    has_tools: bool,
) -> str:
    """The template text one request renders with (see the module docstring for the order)."""
    if request_template is not None:
        return model_templates.get(request_template, request_template)
    if server_template is not None:
        return server_template
    if has_tools and TOOL_USE_TEMPLATE_NAME in model_templates:
        return model_templates[TOOL_USE_TEMPLATE_NAME]
    if DEFAULT_TEMPLATE_NAME in model_templates:
        return model_templates[DEFAULT_TEMPLATE_NAME]
    if model_templates:
        names = ", ".join(sorted(model_templates))
        raise InvalidRequestError(
            f"the model has several chat templates and no default; pass chat_template with "
            f"one of: {names}",
            field="chat_template",
        )
    raise InvalidRequestError(
        "the model has no chat template: start the server with --chat-template FILE "
        "(or pass chat_template in the request)",
        field="messages",
    )


def _templates_in_json(config_path: Path) -> dict[str, str]:
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read {config_path}: {error}") from None
    value = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(value, str):
        return {DEFAULT_TEMPLATE_NAME: value}
    if isinstance(value, list):
        return {
            entry["name"]: entry["template"]
            for entry in value
            if isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and isinstance(entry.get("template"), str)
        }
    return {}
