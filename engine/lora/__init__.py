"""Multi-LoRA serving: PEFT adapters read and checked (adapter.py), the adapters a request may
name (request.py), and their residency in the runner's stacked slots (slots.py)."""
