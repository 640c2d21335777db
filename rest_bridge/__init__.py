"""OpenAI-compatible REST bridge: turns OpenAI HTTP requests into streaming gRPC calls to the
engine. Depends only on the generated protoserve.v1 stubs, never on the engine package."""
