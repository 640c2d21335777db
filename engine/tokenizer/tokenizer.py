"""The engine's tokenizer: a Hugging Face fast tokenizer plus the model's chat templates."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from engine.errors import InvalidRequestError, ModelLoadError
from engine.tokenizer.added_token_spacing import AddedTokenSpacing
from engine.tokenizer.chat_template import RESERVED_TEMPLATE_VARIABLES, render_chat_template
from engine.tokenizer.template_worker import TemplateWorker
from engine.tokenizer.content_format import ContentFormat, resolve_content_format
from engine.tokenizer.detokenizer import IncrementalDetokenizer
from engine.tokenizer.template_sources import (
    load_server_chat_template,
    read_model_chat_templates,
    select_chat_template,
)

if TYPE_CHECKING:
    from engine.generation import ChatPrompt
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


class Tokenizer:
    """Encoding, decoding and chat rendering for one served model. Immutable after load."""

    def __init__(
        self,
        hf_tokenizer: PreTrainedTokenizerBase,
        *,
        model_templates: dict[str, str],
        server_template: str | None,
        content_format: str = "auto",
    ) -> None:
        self._hf = hf_tokenizer
        # "auto" | "string" | "openai": how request content is shaped for the template.
        self._content_format_option = content_format
        resolve_content_format(None, content_format)  # rejects an unknown option early
        self._model_templates = MappingProxyType(dict(model_templates))
        self._server_template = server_template
        # The Rust tokenizer's decode is what transformers' decode runs, minus its Python
        # overhead, whenever no clean-up pass follows; the detokenizer decodes every step.
        self._backend = hf_tokenizer.backend_tokenizer
        self._decode_via_backend = not getattr(hf_tokenizer, "clean_up_tokenization_spaces", False)
        special_ids = set(hf_tokenizer.all_special_ids)
        special_ids.update(
            token_id
            for token_id, added in hf_tokenizer.added_tokens_decoder.items()
            if added.special
        )
        self._all_special_ids = frozenset(special_ids)
        added_texts = {
            token_id: token.content for token_id, token in hf_tokenizer.added_tokens_decoder.items()
        }
        self._added_token_spacing = AddedTokenSpacing(self, added_texts, self._all_special_ids)
        self._special_token_variables = MappingProxyType(dict(hf_tokenizer.special_tokens_map))
        # Request-supplied templates render there (its process starts on first use).
        self._template_worker = TemplateWorker()

    @classmethod
    def load(
        cls, path: str, *, chat_template: str | None = None, content_format: str = "auto",
        announce: bool = True,
    ) -> Tokenizer:
        """Load from a local directory or a hub id already in the local HF cache (offline).

        `chat_template` is the server's `--chat-template`: a file path or the template text.
        `announce`: log the detected content format (False where another process does).
        Raises ModelLoadError with a one-line message when the tokenizer cannot be served.
        """
        directory = _resolve_directory(path)
        hf_tokenizer = _load_hf_tokenizer(directory)
        server_template = load_server_chat_template(chat_template) if chat_template else None
        model_templates = read_model_chat_templates(directory)
        if not model_templates:
            model_templates = _templates_known_to_transformers(hf_tokenizer)
        tokenizer = cls(
            hf_tokenizer,
            model_templates=model_templates,
            server_template=server_template,
            content_format=content_format,
        )
        if announce:
            tokenizer._log_default_content_format()
        return tokenizer

    @property
    def vocab_size(self) -> int:
        """Size of the full vocabulary, added tokens included."""
        return len(self._hf)

    @property
    def hf(self) -> PreTrainedTokenizerBase:
        """The wrapped Hugging Face tokenizer: grammar backends build token tables from it."""
        return self._hf

    @property
    def eos_token_id(self) -> int | None:

        return self._hf.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self._hf.bos_token_id

    @property
    def all_special_ids(self) -> frozenset[int]:
        """Named special tokens and every added token flagged special."""
        return self._all_special_ids

    @property
    def has_chat_template(self) -> bool:
        return self._server_template is not None or bool(self._model_templates)

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def encode_chat(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """Encode a rendered chat prompt. Templates usually write BOS themselves; when the
        client also asked for special tokens, the second BOS is dropped (a doubled BOS
        degrades many models' output) and the request is logged."""
        token_ids = self.encode(text, add_special_tokens=add_special_tokens)
        bos = self._hf.bos_token_id
        if add_special_tokens and bos is not None and token_ids[:2] == [bos, bos]:
            logger.warning(
                "add_special_tokens=true with a chat template that writes BOS itself: "
                "dropped the second BOS"
            )
            del token_ids[0]
        return token_ids

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        ids = list(token_ids)
        if self._decode_via_backend:
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        return list(self._hf.convert_ids_to_tokens(list(token_ids)))

    def new_detokenizer(
        self,
        prompt_token_ids: list[int],
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> IncrementalDetokenizer:
        """A detokenizer whose output concatenates to the decoding of the output ids.

        With special tokens kept (`skip_special_tokens=False`) and
        `spaces_between_special_tokens` (the default), added tokens are set off by spaces as
        the reference server renders them (see added_token_spacing.py); otherwise the text is
        `decode(output ids)`.
        """
        spaced = not skip_special_tokens and spaces_between_special_tokens
        return IncrementalDetokenizer(
            self._added_token_spacing if spaced else self,
            prompt_token_ids,
            skip_special_tokens=skip_special_tokens,
        )

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text for a conversation; encode it with add_special_tokens=False, since
        templates write their own BOS. Raises InvalidRequestError on any template problem."""
        source = select_chat_template(
            chat_template, self._server_template, self._model_templates, has_tools=bool(tools)
        )
        content_format = resolve_content_format(source, self._content_format_option)
        extra = dict(chat_template_kwargs or {})
        reserved = sorted(RESERVED_TEMPLATE_VARIABLES.intersection(extra))
        if reserved:
            raise InvalidRequestError(
                f"chat_template_kwargs cannot set {', '.join(reserved)} (they have their own "
                "request fields)",
                field="chat_template_kwargs",
            )
        arguments = dict(
            source=source,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            documents=documents,
            variables={**self._special_token_variables, **extra},
            content_format=content_format,
        )
        if chat_template is not None and chat_template not in self._model_templates:
            # A client's own template is untrusted code: bounded in time and memory.
            return self._template_worker.render(**arguments)
        return render_chat_template(**arguments)

    def render_chat_prompt(self, chat: ChatPrompt) -> str:
        """`render_chat` for a request's ChatPrompt (generate, embed, tokenize alike)."""
        if not chat.messages:
            raise InvalidRequestError("messages must not be empty", field="messages")
        return self.render_chat(
            chat.messages,
            add_generation_prompt=chat.add_generation_prompt,
            continue_final_message=chat.continue_final_message,
            chat_template=chat.chat_template,
            chat_template_kwargs=chat.chat_template_kwargs,
            tools=chat.tools,
            documents=chat.documents,
        )

    def default_content_format(self) -> ContentFormat:
        """The content format of the template a request without overrides renders with."""
        try:
            source = select_chat_template(
                None, self._server_template, self._model_templates, has_tools=False
            )
        except InvalidRequestError:
            source = None
        return resolve_content_format(source, self._content_format_option)

    def _log_default_content_format(self) -> None:
        found = self.default_content_format()
        if self._content_format_option == "auto":
            logger.info("Detected the chat template content format to be '%s'. Set "
                        "--chat-template-content-format to override.", found)
        else:
            logger.info("Using the chat template content format '%s' (set by "
                        "--chat-template-content-format).", found)


def _resolve_directory(path: str) -> Path:
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=path, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not available offline"
        raise ModelLoadError(
            f"tokenizer not found: {path!r} is neither a directory nor a model in the local "
            "Hugging Face cache"
        ) from None


def _load_hf_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """AutoTokenizer first (it knows model-specific classes); the generic fast tokenizer when
    the config names a class this transformers version lacks (e.g. `TokenizersBackend`)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not (directory / "tokenizer.json").is_file() and not (
        directory / "tokenizer_config.json"
    ).is_file():
        raise ModelLoadError(f"no tokenizer in {directory} (tokenizer.json is missing)")
    errors: list[str] = []
    for loader in (AutoTokenizer, PreTrainedTokenizerFast):
        try:
            hf_tokenizer = loader.from_pretrained(str(directory), local_files_only=True)
        except Exception as error:  # noqa: BLE001 - reported below as one line
            errors.append(f"{type(error).__name__}: {_first_line(error)}")
            continue
        if getattr(hf_tokenizer, "is_fast", False):
            return hf_tokenizer
        errors.append(f"{type(hf_tokenizer).__name__} is not a fast tokenizer")
    raise ModelLoadError(f"cannot load the tokenizer in {directory}: {errors[0]}")


def _templates_known_to_transformers(hf_tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """Templates transformers found where our own reading did not (e.g. a future layout)."""
    found = getattr(hf_tokenizer, "chat_template", None)
    if isinstance(found, str):
        return {"default": found}
    if isinstance(found, dict):
        return {str(name): text for name, text in found.items() if isinstance(text, str)}
    return {}


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no details"
