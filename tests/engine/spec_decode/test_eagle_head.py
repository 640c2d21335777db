"""The EAGLE head's proposals equal an independent reference (transformers' Llama decoder
layer over the whole sequence, recomputed per draft) fed with transformers' hidden states of
the target: fed in prompt chunks, in one batch with another request, after a verification
(guessed positions dropped), after a restart (preemption) and from a prefix hit. Checkpoints
the head cannot serve are refused naming the field."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from eagle_heads import ReferenceHead, make_eagle_head
from greedy_reference import VOCAB, make_peaked_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from engine.spec_decode.eagle import EagleProposer, SettledRows
from engine.spec_decode.eagle_head import EagleHead


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peaked_model(tmp_path_factory.mktemp("eagle-target"), "llama")


@pytest.fixture(scope="module")
def target(target_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()


def _hidden(target: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """The target's final-norm hidden states, one row per token."""
    with torch.no_grad():
        return target.model(torch.tensor([token_ids])).last_hidden_state[0]


def _lm_head(target: torch.nn.Module):
    return lambda rows: target.lm_head(rows).float()


def _rows(request_id: str, seq: list[int], hidden: torch.Tensor, start: int,
          end: int) -> SettledRows:
    """Positions start .. end - 1 settled, each with the token after it."""
    return SettledRows(request_id, start, seq[start + 1 : end + 1], hidden[start:end])


@pytest.mark.parametrize("variant", [
    {}, {"model_prefix": True, "fc_bias": True}, {"own_embedding": True, "torch_bin": True},
])
def test_proposals_equal_the_reference_head(tmp_path: Path, target_dir: Path,
                                            target: torch.nn.Module, variant: dict) -> None:
    head_dir = make_eagle_head(tmp_path / "head", target_dir, seed=1, **variant)
    head = EagleHead(str(head_dir), hidden_size=64, vocab_size=VOCAB, dtype=torch.float32,
                     device=torch.device("cpu"))
    embedding = target.model.embed_tokens.weight.detach()
    proposer = EagleProposer(head, head.embed_tokens if head.embed_tokens is not None
                             else embedding, _lm_head(target))
    reference = ReferenceHead(head_dir, embedding, _lm_head(target))
    rng = random.Random(5)
    seq = [rng.randrange(1, VOCAB) for _ in range(24)]
    other = [rng.randrange(1, VOCAB) for _ in range(17)]
    hidden, other_hidden = _hidden(target, seq), _hidden(target, other)

    # A prompt in two chunks; the second batched with another request's only chunk.
    proposer.extend([_rows("a", seq, hidden, 0, 7)])
    proposer.extend([_rows("a", seq, hidden, 7, 23), _rows("b", other, other_hidden, 0, 16)])
    # Both requests' drafts in one batch, of different lengths.
    assert proposer.propose_batch({"a": (seq, 3), "b": (other, 4)}) == {
        "a": reference.proposals(seq, hidden, 0, 3),
        "b": reference.proposals(other, other_hidden, 0, 4),
    }

    # A verification that kept one draft: the newest token and the draft settle.
    longer = seq + [rng.randrange(1, VOCAB) for _ in range(2)]
    longer_hidden = _hidden(target, longer)
    proposer.extend([_rows("a", longer, longer_hidden, 23, 25)])
    assert proposer.propose("a", longer, 4) == reference.proposals(longer, longer_hidden, 0, 4)
    # Out of step with the request's tokens: nothing proposed.
    assert proposer.propose("a", longer + [3], 2) == []

    # Preempted and recomputed from the start, in one chunk.
    proposer.extend([_rows("a", longer, longer_hidden, 0, 25)])
    assert proposer.propose("a", longer, 2) == reference.proposals(longer, longer_hidden, 0, 2)

    # A prefix hit: the head sees only the positions computed for the request.
    proposer.forget("b")
    proposer.extend([_rows("b", seq, hidden, 8, 23)])
    assert proposer.propose("b", seq, 3) == reference.proposals(seq, hidden, 8, 3)


def _head_kwargs() -> dict:
    return dict(hidden_size=64, vocab_size=VOCAB, dtype=torch.float32,
                device=torch.device("cpu"))


def _rewrite(head_dir: Path, change) -> None:
    path = head_dir / "model.safetensors"
    weights = load_file(str(path))
    change(weights)
    save_file(weights, str(path))


def test_checkpoints_that_do_not_fit_are_refused(tmp_path: Path, target_dir: Path) -> None:
    head_dir = make_eagle_head(tmp_path / "no-fc", target_dir)
    _rewrite(head_dir, lambda w: w.pop("fc.weight"))
    with pytest.raises(ValueError, match="'model'.*no fc.weight"):
        EagleHead(str(head_dir), **_head_kwargs())

    head_dir = make_eagle_head(tmp_path / "no-mlp", target_dir)
    _rewrite(head_dir, lambda w: w.pop("layers.0.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="lacks layers.0.mlp.up_proj.weight"):
        EagleHead(str(head_dir), **_head_kwargs())

    head_dir = make_eagle_head(tmp_path / "ok", target_dir)
    with pytest.raises(ValueError, match="'model'.*hidden_size 64 differs from the target's 32"):
        EagleHead(str(head_dir), **{**_head_kwargs(), "hidden_size": 32})
    with pytest.raises(ValueError, match=f"vocab_size {VOCAB} differs from the target's 500"):
        EagleHead(str(head_dir), **{**_head_kwargs(), "vocab_size": 500})

    _rewrite(head_dir, lambda w: w.update({"fc.weight": w["fc.weight"][:, :64].contiguous()}))
    with pytest.raises(ValueError, match=r"fc.weight has shape \(64, 64\)"):
        EagleHead(str(head_dir), **_head_kwargs())

    with pytest.raises(ValueError, match="has no config.json"):
        EagleHead(str(tmp_path / "missing"), **_head_kwargs())
