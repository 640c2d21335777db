"""Model implementations, the architecture registry and the safetensors loader."""
