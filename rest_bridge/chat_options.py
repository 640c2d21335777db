"""Start-up options of chat response features: which parsers read reasoning and tool calls
(the engine runs them; the bridge names them in each request), media limits and the usage
details (chat and completions)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from protoserve.arg_types import parse_bytes

DEFAULT_MAX_MEDIA_BYTES = 20 * 2**20
# 4096 x 4096: larger images are refused from their header, before any pixel is decoded.
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


@dataclass(frozen=True, slots=True)
class ChatOptions:
    # Parse tool calls out of output text when tool_choice is "auto" (explicit or implied).
    enable_auto_tool_choice: bool = False
    # A parser name the engine knows (built in, or registered by engine-serve's
    # --tool-parser-plugin); engine-serve checks it at start-up, the engine per request.
    tool_call_parser: str | None = None
    # Reads reasoning_content out of chat output (deepseek_r1, qwen3, mistral).
    reasoning_parser: str | None = None
    # Hosts whose http(s) media URLs a request may name; none by default (no fetching for
    # strangers). A leading "." admits subdomains: ".example.com".
    allowed_media_domains: tuple[str, ...] = ()
    # Decoded bytes of one media item (data: URL or input_audio).
    max_media_bytes: int = DEFAULT_MAX_MEDIA_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    # usage.prompt_tokens_details.cached_tokens (prompt tokens served from the prefix cache)
    # in chat and completion responses; off by default, as on the reference server.
    enable_prompt_tokens_details: bool = False
    # Logprob tokens as "token_id:N" for requests that do not set return_tokens_as_token_ids
    # themselves (the reference server's --return-tokens-as-token-ids).
    return_tokens_as_token_ids: bool = False
    # Finished /v1/responses kept for GET and previous_response_id (least recently used go
    # first; 0 keeps none).
    responses_store_size: int = 1000

    def __post_init__(self) -> None:
        if self.tool_call_parser is not None and not self.tool_call_parser:
            raise ValueError("--tool-call-parser must not be empty")
        if self.reasoning_parser is not None and not self.reasoning_parser:
            raise ValueError("--reasoning-parser must not be empty")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
        if self.max_media_bytes < 1 or self.max_image_pixels < 1:
            raise ValueError("media limits must be >= 1")
        if self.responses_store_size < 0:
            raise ValueError("--responses-store-size must be >= 0")

    @property
    def auto_tool_parser(self) -> str | None:
        """The parser for tool_choice "auto", or None when auto tool choice is off."""
        return self.tool_call_parser if self.enable_auto_tool_choice else None


def add_chat_args(parser: argparse.ArgumentParser) -> None:
    """The bridge's response-feature flags; engine-serve declares the same ones (this
    function) and hands them on to its bridge child (`chat_args`)."""
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help="parse tool calls out of model output (needs --tool-call-parser)")
    parser.add_argument("--tool-call-parser", default=None,
                        help="the model family's tool-call format: hermes, llama3_json, "
                        "mistral, pythonic, qwen3_coder, deepseek_v3, granite, internlm, jamba "
                        "or a --tool-parser-plugin's name")
    parser.add_argument("--reasoning-parser", default=None,
                        help="read the model's reasoning into reasoning_content: deepseek_r1, "
                        "qwen3, mistral or gpt_oss (harmony channels, tool calls included)")
    parser.add_argument("--allowed-media-domains", nargs="*", default=[],
                        help="hosts whose http(s) media URLs requests may name (default: none)")
    parser.add_argument("--max-media-bytes", type=parse_bytes, default=DEFAULT_MAX_MEDIA_BYTES,
                        help="largest decoded image or audio item, e.g. 20MiB")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="largest image (width x height) a request may carry; larger ones "
                        "are refused from their header")
    parser.add_argument("--enable-prompt-tokens-details", action="store_true",
                        help="add usage.prompt_tokens_details.cached_tokens (prompt tokens "
                        "served from the prefix cache) to chat and completion responses")
    parser.add_argument("--return-tokens-as-token-ids", action="store_true",
                        help="logprob tokens as 'token_id:N' (for tokens that are not valid "
                        "UTF-8 alone) unless a request sets return_tokens_as_token_ids")
    parser.add_argument("--responses-store-size", type=int, default=1000,
                        help="finished /v1/responses kept in memory for GET and "
                        "previous_response_id, least recently used dropped first (0: none)")


def chat_options_from_args(args: argparse.Namespace) -> ChatOptions:
    return ChatOptions(
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        allowed_media_domains=tuple(args.allowed_media_domains or ()),
        max_media_bytes=args.max_media_bytes,
        max_image_pixels=args.max_image_pixels,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        responses_store_size=args.responses_store_size,
    )


def chat_args(options: ChatOptions) -> list[str]:
    """The command line that `add_chat_args` parses back into `options`."""
    extra: list[str] = []
    if options.enable_auto_tool_choice:
        extra.append("--enable-auto-tool-choice")
    if options.tool_call_parser:
        extra += ["--tool-call-parser", options.tool_call_parser]
    if options.reasoning_parser:
        extra += ["--reasoning-parser", options.reasoning_parser]
    if options.allowed_media_domains:
        extra += ["--allowed-media-domains", *options.allowed_media_domains]
    extra += ["--max-media-bytes", str(options.max_media_bytes),
              "--max-image-pixels", str(options.max_image_pixels)]
    if options.enable_prompt_tokens_details:
        extra.append("--enable-prompt-tokens-details")
    if options.return_tokens_as_token_ids:
        extra.append("--return-tokens-as-token-ids")
    extra += ["--responses-store-size", str(options.responses_store_size)]
    return extra
