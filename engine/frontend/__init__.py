"""The serving side of the engine (asyncio, in the gRPC process): input processing, the
core client, request streams and detokenizing, the best_of / beam drivers, and the offline
`LLM`, which drives the same core in-process."""
