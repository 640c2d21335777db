"""Which shape of message `content` a chat template expects: a string, or OpenAI's list of parts.

Most templates concatenate `message['content']` as a string; some newer ones loop over it as a
list of `{"type": "text", "text": ...}` parts. We tell them apart by walking the template's Jinja
AST: a template is "openai" when it runs a `for` loop over the `content` of a message taken
from `messages`, following the aliases a template may create on the way (`{% set %}`, slices,
filters). Anything else, and any template that does not parse, is "string".
"""
from __future__ import annotations

import functools
from typing import Literal

import jinja2
import jinja2.nodes as nodes

from engine.tokenizer.template_sandbox import sandboxed_environment

ContentFormat = Literal["string", "openai"]
CONTENT_FORMAT_OPTIONS = ("auto", "string", "openai")


def resolve_content_format(source: str | None, option: str) -> ContentFormat:
    """The format to convert request content to: the explicit option, else detection."""
    if option == "string" or option == "openai":
        return option
    if option != "auto":
        raise ValueError(f"chat template content format must be one of {CONTENT_FORMAT_OPTIONS}")
    return detect_content_format(source) if source is not None else "string"


@functools.lru_cache(maxsize=32)
def detect_content_format(source: str) -> ContentFormat:
    try:
        tree = sandboxed_environment().parse(source)
    except jinja2.TemplateSyntaxError:
        return "string"
    return "openai" if _loops_over_message_content(tree) else "string"


def _loops_over_message_content(tree: nodes.Template) -> bool:
    message_lists = _aliases(tree, {"messages"}, key=None)
    message_names = {
        loop.target.name
        for loop in tree.find_all(nodes.For)
        if isinstance(loop.target, nodes.Name)
        and any(_reads(loop.iter, name, key=None) for name in message_lists)
    }
    if not message_names:
        return False
    # `{% set content = message['content'] %}` and the like name the content itself.
    content_names = _direct_assignments(tree, message_names, key="content")
    content_names = _aliases(tree, content_names, key=None) if content_names else set()
    for loop in tree.find_all(nodes.For):
        if any(_reads(loop.iter, name, key="content") for name in message_names):
            return True
        if any(_reads(loop.iter, name, key=None) for name in content_names):
            return True
    return False


def _aliases(tree: nodes.Template, roots: set[str], key: str | None) -> set[str]:
    """`roots` plus every variable assigned (transitively) from one of them."""
    found = set(roots)
    while True:
        new = _direct_assignments(tree, found, key=key) - found
        if not new:
            return found
        found |= new
        # Aliases of aliases read the whole value, never a key of it.
        key = None


def _direct_assignments(tree: nodes.Template, sources: set[str], key: str | None) -> set[str]:
    names: set[str] = set()
    for assign in tree.find_all(nodes.Assign):
        if isinstance(assign.target, nodes.Name) and any(
            _reads(assign.node, source, key=key) for source in sources
        ):
            names.add(assign.target.name)
    return names


def _reads(node: nodes.Node, name: str, key: str | None) -> bool:
    """Whether `node` is `name` (or `name[key]` / `name.key`), possibly sliced, filtered or
    tested: `messages[1:]`, `messages | selectattr(...)`, `message.content | list`."""
    if isinstance(node, (nodes.Filter, nodes.Test)):
        return node.node is not None and _reads(node.node, name, key)
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
        return _reads(node.node, name, key)
    if key is None:
        return isinstance(node, nodes.Name) and node.ctx == "load" and node.name == name
    if isinstance(node, nodes.Getitem):
        return (
            isinstance(node.arg, nodes.Const)
            and node.arg.value == key
            and _reads(node.node, name, None)
        )
    if isinstance(node, nodes.Getattr):
        return node.attr == key and _reads(node.node, name, None)
    return False
