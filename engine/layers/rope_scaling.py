"""RoPE settings of a checkpoint and the inverse frequencies of every scaling type.

Each `_<type>_frequencies` follows `transformers.modeling_rope_utils._compute_<type>_parameters`
(transformers 5.x) operation for operation, so the float32 tables come out bit-identical; the
returned attention scaling multiplies cos and sin, as transformers' rotary classes do.

transformers recomputes `dynamic` and `longrope` frequencies from each forward's sequence
length. A serving engine keeps one table for every position (keys in the KV cache were rotated
with it), so, as vLLM does:
- `dynamic` (NTK): frequencies fixed at the NTK base for `max_position_embeddings * factor`
  positions, for every sequence. transformers uses the same frequencies when the sequence reaches
  that length; shorter sequences there keep the unscaled base instead.
- `longrope` (Phi-3/Phi-4): the long factors once the served length (`max_positions`, the
  engine's max model length) exceeds `original_max_position_embeddings`, else the short factors.
  With the short factors the table equals transformers' for every sequence up to that length;
  with the long ones it equals transformers' frequencies past it. The attention factor applies
  to both, as in transformers.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

_DEFAULT_THETA = 10000.0
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
# Names older checkpoints use for a type above (Phi-3 configs once said "su" for LongRoPE).
_ROPE_TYPE_ALIASES = {"su": "longrope"}
_REQUIRED = object()


@dataclass(frozen=True)
class RopeSpec:
    """The RoPE settings of a checkpoint, normalised from either config layout."""

    theta: float
    rope_type: str
    scaling: Mapping[str, Any]
    partial_rotary_factor: float = 1.0
    # An explicit rotary width (GPT-J-style configs); wins over partial_rotary_factor.
    rotary_dim: int | None = None
    max_position_embeddings: int | None = None
    # Phi-3 keeps it next to max_position_embeddings; transformers gives that copy priority.
    original_max_position_embeddings: int | None = None
    # Where the parameters came from, so errors name the field as the config spells it.
    field: str = "rope_parameters"


def read_rope_spec(hf_config: Any) -> RopeSpec:
    """Accept both `rope_parameters: {rope_theta, rope_type, ...}` (transformers 5) and the older
    top-level `rope_theta` with an optional `rope_scaling: {type|rope_type, factor, ...}`."""
    field = "rope_parameters"
    params = getattr(hf_config, "rope_parameters", None)
    if not params and getattr(hf_config, "rope_scaling", None):
        field, params = "rope_scaling", hf_config.rope_scaling
    if params is not None and not isinstance(params, Mapping):
        raise ValueError(f"{field} must be a mapping, got {params!r}")
    params = dict(params or {})
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None) or _DEFAULT_THETA)
    rope_type = str(params.get("rope_type", params.get("type", "default")) or "default")
    partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None))
    return RopeSpec(
        theta=_positive_number(f"{field}.rope_theta", theta),
        rope_type=_ROPE_TYPE_ALIASES.get(rope_type, rope_type),
        scaling=params,
        partial_rotary_factor=1.0 if partial is None else _partial_factor(field, partial),
        rotary_dim=getattr(hf_config, "rotary_dim", None),
        max_position_embeddings=getattr(hf_config, "max_position_embeddings", None),
        original_max_position_embeddings=getattr(
            hf_config, "original_max_position_embeddings", None
        ),
        field=field,
    )


def rotary_dim_of(spec: RopeSpec, head_dim: int) -> int:
    """How many leading dims of each head rotate; the rest pass through unchanged."""
    if spec.rotary_dim is not None:
        dim, name = spec.rotary_dim, "rotary_dim"
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ValueError(f"rotary_dim must be an integer, got {dim!r}")
    else:
        dim = int(head_dim * spec.partial_rotary_factor)
        name = f"{spec.field}.partial_rotary_factor"
    if dim < 2 or dim > head_dim or dim % 2:
        raise ValueError(
            f"{name} gives a rotary dimension of {dim} for head_dim {head_dim}; "
            "it must be even and between 2 and head_dim"
        )
    return dim


def rope_frequencies(
    spec: RopeSpec, head_dim: int, max_positions: int | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rotary_dim // 2] in float32 and the attention scaling that cos/sin
    are multiplied by. `max_positions` (the served length) picks LongRoPE's factor set; None
    means a short context, as at transformers' initialisation."""
    dim = rotary_dim_of(spec, head_dim)
    if spec.rope_type == "default":
        return _base_inv_freq(spec.theta, dim), 1.0
    if spec.rope_type == "linear":
        return _base_inv_freq(spec.theta, dim) / _require_positive(spec, "factor"), 1.0
    if spec.rope_type == "dynamic":
        return _dynamic_frequencies(spec, dim), 1.0
    if spec.rope_type == "yarn":
        return _yarn_frequencies(spec, dim)
    if spec.rope_type == "longrope":
        return _longrope_frequencies(spec, dim, max_positions)
    if spec.rope_type == "llama3":
        return _llama3_frequencies(spec, dim), 1.0
    raise ValueError(
        f"unsupported {spec.field}.rope_type {spec.rope_type!r}; "
        f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (theta**exponents)


def _dynamic_frequencies(spec: RopeSpec, dim: int) -> torch.Tensor:
    factor = _require_positive(spec, "factor")
    max_position_embeddings = _max_position_embeddings(spec)
    # The NTK base transformers reaches at seq_len = max_position_embeddings * factor.
    seq_len = max(max_position_embeddings * factor, max_position_embeddings)
    base = spec.theta * (
        (factor * seq_len / max_position_embeddings) - (factor - 1)
    ) ** (dim / (dim - 2))
    return _base_inv_freq(base, dim)


def _yarn_frequencies(spec: RopeSpec, dim: int) -> tuple[torch.Tensor, float]:
    original = _original_max_positions(spec)
    factor = _param(spec, "factor", default=None)
    if factor is None:
        # DeepSeek-V3 style: the factor is the ratio of the extended to the pretrained length.
        factor = _max_position_embeddings(spec) / original
    factor = _positive_number(f"{spec.field}.factor", factor)
    attention_factor = _optional_positive(spec, "attention_factor")
    mscale = _optional_number(spec, "mscale")
    mscale_all_dim = _optional_number(spec, "mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(
                _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            )
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = _optional_number(spec, "beta_fast") or 32
    beta_slow = _optional_number(spec, "beta_slow") or 1
    truncate = spec.scaling.get("truncate", True)
    if truncate is not None and not isinstance(truncate, bool):
        raise ValueError(f"{spec.field}.truncate must be true or false, got {truncate!r}")

    low = _yarn_correction_dim(beta_fast, dim, spec.theta, original)
    high = _yarn_correction_dim(beta_slow, dim, spec.theta, original)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)

    pos_freqs = spec.theta ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    # Dims that turn many times within the pretrained length keep their frequency
    # (extrapolation); slow ones are interpolated by `factor`; the ramp blends in between.
    extrapolation = 1 - ramp
    inv_freq = inv_freq_interpolation * (1 - extrapolation) + inv_freq_extrapolation * extrapolation
    return inv_freq, attention_factor


def _yarn_mscale(scale: float, mscale: float = 1) -> float:
    """The YaRN paper's Eq. 21: 0.1 * mscale * ln(scale) + 1."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(
    num_rotations: float, dim: int, base: float, original_max_positions: int
) -> float:
    """The dimension whose wavelength turns `num_rotations` times in the pretrained length."""
    return (dim * math.log(original_max_positions / (num_rotations * 2 * math.pi))) / (
        2 * math.log(base)
    )


def _longrope_frequencies(
    spec: RopeSpec, dim: int, max_positions: int | None
) -> tuple[torch.Tensor, float]:
    original = _original_max_positions(spec)
    short_factor = _factor_list(spec, "short_factor", dim)
    long_factor = _factor_list(spec, "long_factor", dim)
    factor = _param(spec, "factor", default=None)
    if factor is None:
        # Phi-3 style: the factor is the ratio of the extended to the pretrained length.
        factor = _max_position_embeddings(spec) / original
    factor = _positive_number(f"{spec.field}.factor", factor)
    attention_factor = _optional_positive(spec, "attention_factor")
    if attention_factor is None:
        attention_factor = (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        )
    use_long = max_positions is not None and max_positions > original
    ext_factors = torch.tensor(long_factor if use_long else short_factor, dtype=torch.float32)
    inv_freq_shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext_factors * spec.theta**inv_freq_shape), attention_factor


def _llama3_frequencies(spec: RopeSpec, dim: int) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths are divided by `factor`, short ones kept, and the
    band in between is interpolated smoothly."""
    inv_freq = _base_inv_freq(spec.theta, dim)
    factor = _require_positive(spec, "factor")
    low_freq_factor = _require_positive(spec, "low_freq_factor")
    high_freq_factor = _require_positive(spec, "high_freq_factor")
    if high_freq_factor <= low_freq_factor:
        raise ValueError(
            f"{spec.field}.high_freq_factor ({high_freq_factor}) must be greater than "
            f"low_freq_factor ({low_freq_factor})"
        )
    old_context_len = _original_max_positions(spec)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _original_max_positions(spec: RopeSpec) -> int:
    """The pretrained context length: the config's top-level copy (Phi-3), else the rope
    parameters', else max_position_embeddings, the default transformers fills in."""
    if spec.original_max_position_embeddings is not None:
        return _config_positive_int(
            "original_max_position_embeddings", spec.original_max_position_embeddings
        )
    value = spec.scaling.get("original_max_position_embeddings", spec.max_position_embeddings)
    if value is None:
        raise ValueError(
            f"{spec.field}.original_max_position_embeddings is required for rope_type "
            f"{spec.rope_type!r}"
        )
    return _config_positive_int(f"{spec.field}.original_max_position_embeddings", value)


def _max_position_embeddings(spec: RopeSpec) -> int:
    return _config_positive_int("max_position_embeddings", spec.max_position_embeddings)


def _factor_list(spec: RopeSpec, key: str, dim: int) -> list[float]:
    values = _param(spec, key)
    if not isinstance(values, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values
    ):
        raise ValueError(f"{spec.field}.{key} must be a list of positive numbers, got {values!r}")
    if len(values) != dim // 2:
        raise ValueError(
            f"{spec.field}.{key} has {len(values)} entries; "
            f"the rotary dimension {dim} needs {dim // 2}"
        )
    return list(values)


def _param(spec: RopeSpec, key: str, default: Any = _REQUIRED) -> Any:
    value = spec.scaling.get(key, default)
    if value is _REQUIRED:
        raise ValueError(f"{spec.field}.{key} is required for rope_type {spec.rope_type!r}")
    return value


def _require_positive(spec: RopeSpec, key: str) -> float:
    return _positive_number(f"{spec.field}.{key}", _param(spec, key))


def _optional_positive(spec: RopeSpec, key: str) -> float | None:
    value = spec.scaling.get(key)
    return None if value is None else _positive_number(f"{spec.field}.{key}", value)


def _optional_number(spec: RopeSpec, key: str) -> float | None:
    value = spec.scaling.get(key)
    if value is None:
        return None
    if not _is_number(value):
        raise ValueError(f"{spec.field}.{key} must be a number, got {value!r}")
    return value


def _partial_factor(field: str, value: Any) -> float:
    if not _is_number(value) or not 0 < value <= 1:
        raise ValueError(f"{field}.partial_rotary_factor must be in (0, 1], got {value!r}")
    return float(value)


def _positive_number(name: str, value: Any) -> float:
    if not _is_number(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _config_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    )
