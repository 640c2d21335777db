"""The Anthropic Messages API (`/v1/messages`, `/v1/messages/count_tokens`) as a translation
onto the chat pipeline: request -> ChatCompletionRequest -> the chat route's own run ->
chat.completion body or chunks -> Anthropic message or events."""
