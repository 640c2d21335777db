"""Which weight quantization a model is served with: the checkpoint's own (compressed-tensors,
GPTQ, AWQ; GGUF files in models/gguf_checkpoint.py) or online int8/int4 (`--quantization`); the
layers are in layers/quantized_linear.py."""
