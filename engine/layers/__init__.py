"""Building blocks of the forward pass: rotary embeddings, norms, activations."""
