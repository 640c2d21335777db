"""OpenAI's Responses API (`/v1/responses`) as a translation onto the chat pipeline."""
