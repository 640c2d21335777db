"""transformers baselines over token ids: static-batch `generate` and continuous-batching
`generate_batch`, each wrapped as `run(prompts) -> generated token ids` for the benchmarks.

Both are greedy and produce exactly `output_len` tokens per prompt (EOS ignored), to match
protoserve requests with `ignore_eos=True`.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import numpy  # noqa: F401  (torch warns when imported without numpy loaded first)
import torch

Prompts = list[list[int]]
Outputs = list[list[int]]


def load_hf_model(
    model_dir: Path, device: torch.device | str = "cpu", *, seed: int | None = None
) -> torch.nn.Module:
    """The checkpoint in `model_dir`; with `seed`, random weights for its config.json alone
    (transformers' own initialisation, drawn on `device`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if seed is None:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
        return model.to(device).eval()
    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    return model.eval()


def make_hf_generate(
    model: torch.nn.Module, output_len: int, batch_size: int
) -> Callable[[Prompts], Outputs]:
    pad_id = 0
    device = next(model.parameters()).device

    def run(prompts: Prompts) -> Outputs:
        outputs: Outputs = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            # Left padding keeps every row's last prompt token in the last column.
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            with torch.inference_mode():
                generated = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    do_sample=False,
                    max_new_tokens=output_len,
                    min_new_tokens=output_len,
                    pad_token_id=pad_id,
                )
            outputs.extend(generated[:, width:].tolist())
        return outputs

    return run


def make_hf_generate_batch(
    model: torch.nn.Module, output_len: int, input_len: int, num_prompts: int, max_batch_tokens: int
) -> Callable[[Prompts], Outputs] | str:
    """The runner, or the reason continuous batching is not usable here."""
    if not hasattr(model, "generate_batch"):
        return "this transformers has no model.generate_batch"
    try:
        from transformers import GenerationConfig
        from transformers.generation import ContinuousBatchingConfig
    except ImportError as error:
        return f"continuous batching API not importable: {error}"

    # eos_token_id=-1 disables EOS (its min_new_tokens processor is not supported in CB).
    generation_config = GenerationConfig(
        max_new_tokens=output_len, do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    page_size = 256
    pages_per_request = -(-(input_len + output_len) // page_size)
    # Sized for the workload, like ours: on CPU the default would claim 90% of host RAM. The
    # page-size argument's name differs between transformers releases.
    accepted = inspect.signature(ContinuousBatchingConfig).parameters
    page_arg = next((name for name in ("page_size", "block_size") if name in accepted), None)
    sizes = {"num_blocks": num_prompts * pages_per_request + 4,
             "max_batch_tokens": max_batch_tokens}
    if page_arg is not None:
        sizes[page_arg] = page_size
    try:
        cb_config = ContinuousBatchingConfig(**{k: v for k, v in sizes.items() if k in accepted})
    except (TypeError, ValueError) as error:
        return f"ContinuousBatchingConfig: {error}"

    def run(prompts: Prompts) -> Outputs:
        # Each call starts a fresh manager (cache allocation, worker thread; under a second
        # here), as a user of this API pays it; it also means no prefix cache survives a run.
        # no_grad, not inference_mode: some releases' worker thread updates tensors made here
        # in place outside inference mode, which inference tensors refuse.
        with torch.no_grad():
            results = model.generate_batch(
                inputs=prompts,
                generation_config=generation_config,
                continuous_batching_config=cb_config,
            )
        failed = [key for key, out in results.items() if out.error is not None]
        if len(results) != len(prompts) or failed:
            raise RuntimeError(f"generate_batch: {len(results)} results, failed {failed}")
        return [list(out.generated_tokens) for out in results.values()]

    return run
