"""protoserve engine: continuous batching over a paged KV cache, served over gRPC."""
