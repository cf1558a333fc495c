"""LowRankConfig: how to compress a model, as value types.

`QuantScheme` (bits, group size, zero point) is one quantization scheme, validated once; a LowRankConfig has the
factors' scheme (`factors`). The format a config asks for is the
one registered format that claims it (`format_for_config`: base_bits asks for the hybrid format), or the one named
by `format`; that format checks its own knobs. Derived facts are properties: `weight_format`, `needs_grams`
(the fit needs calibration Gram matrices) and `needs_calibration`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar

from triton_lowrank.core.format import WeightFormat, format_for_config
from triton_lowrank.core.quant import (
    BASE_BITS,
    DEFAULT_GROUP_SIZE,
    SUPPORTED_BITS,
    ZERO_POINT_BITS,
    fitted_group_size,
)

RANK_KNOBS = ("rank", "rank_ratio", "energy", "budget")
# In `exclude`: the model's output head, found by what it is (model.get_output_embeddings()), whatever its name
# (lm_head, embed_out, ...). No module name contains "<", so as a glob pattern it matches nothing else.
OUTPUT_HEAD = "<output head>"


@dataclass(frozen=True)
class QuantScheme:
    """One quantization scheme: `bits` (None = floats in the layer's dtype), `group_size` (features sharing a
    scale; 0 = none: floats and int8 rows) and whether codes carry a zero point. Validated once, here."""

    bits: int | None
    group_size: int = 0
    zero_point: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (*SUPPORTED_BITS, *BASE_BITS):
            raise ValueError(f"QuantScheme: bits must be None, 8, 4, 3 or 2, got {self.bits!r}")
        if self.bits in (4, *ZERO_POINT_BITS) and (self.group_size <= 0 or self.group_size % 2):
            raise ValueError(f"QuantScheme: int{self.bits} needs a positive even group_size, got {self.group_size}")
        if self.zero_point != (self.bits in ZERO_POINT_BITS):
            need = "need" if self.bits in ZERO_POINT_BITS else "have no"
            raise ValueError(f"QuantScheme: int{self.bits} codes {need} zero point")


@dataclass
class LowRankConfig:
    """How to compress a model. Set exactly one of `rank`, `rank_ratio`, `energy`, `budget`.

    rank:       the same rank r for every compressed layer (1 <= r <= min(in, out)).
    rank_ratio: fraction of min(in, out) KEPT as rank in each layer, in (0, 1]; 0.25 keeps a quarter.
    energy:     fraction of the sum of squared singular values KEPT in each layer, in (0, 1].
    budget:     total factor bytes (with scales) as a fraction of the fp16 dense bytes of the layers
                compressed; ranks are allocated ACROSS layers by greedy relative error reduction per byte.
                With base_bits the budget covers the bases AND the corrections: what the bases leave goes
                to correction ranks (by the same greedy rule on each base's error); it must at least hold
                every base plus a rank-1 correction per layer.
    bits:       None keeps unquantized factors in the layer's dtype; 8 = int8 with one scale per
                rank component; 4 = int4 with one scale per `group_size` features, packed two per byte.
    group_size: int4 group width along each factor's feature axis. None (default): per layer, the largest
                even width <= 128 dividing its in and out features (recorded in each layer's spec); a number
                is used as given and must divide them (else a one-line error names the layer).
    method:     "svd" truncates the weight's SVD (optimal in weight space); "whitened" truncates in the
                space whitened by the calibration activations (optimal activation error, SVD-LLM style).
    include:    glob patterns (fnmatch on full module names); None selects every nn.Linear and GPT-2 Conv1D.
    exclude:    glob patterns removed from the selection, and OUTPUT_HEAD ("<output head>"): the model's output
                head, whatever its name; that is the default (set () to compress it).
    damping:    largest relative diagonal damping tried when the calibration Gram matrix is singular.
    shrinkage:  calibrated fits only. How far each layer's Gram matrix S is shrunk toward a scaled identity,
                (1 - α)·S + α·μI, before whitening (and before a hybrid's GPTQ base): "auto" (default) picks α
                from the data alone (Ledoit–Wolf; near 0 with many tokens per feature, near 1 with few).
                "heldout" picks α per layer by held-out error, for calibration text unlike the use: calibration
                keeps every other token's Gram apart, each α of factorize.HELDOUT_ALPHAS and Ledoit–Wolf's is
                fitted on one half and scored on the other in the layer's own fit, and the best is refitted on all
                tokens (2x the Gram memory; ten more fits per layer: on MiniLM 4-8x the fit time,
                bench/results/hybrid/shifted_domain.md). A number in [0, 1] fixes it (0: the raw Gram, SVD-LLM;
                1: a multiple of I, i.e. plain SVD).
    sequential: calibrated fits only (whitening, or base_bits with a GPTQ base or a whitened correction).
                Calibrate block by block, each block on the outputs of the already compressed blocks before
                it; only one block's Gram matrices are in memory at a time. False calibrates every layer on
                the dense model in one pass (all Grams at once).
    error_feedback: quantize the factors GPTQ-style (each rounding error pushed onto what is not yet
                quantized, up refitted to the stored down); False rounds each factor to nearest.
    base_bits:  None (default) stores each layer as low-rank factors alone. 4, 3 or 2 stores the hybrid
                format W ≈ Q + U·D (HybridLinear): a group-wise quantized base Q plus a low-rank correction
                U·D, whose rank comes from `rank`, `rank_ratio` or `budget` and whose factors follow bits/
                group_size/method ("whitened": the correction is optimal on the calibration activations).
    base_group_size: the base's group width along in_features. None (default): per layer, the largest width
                <= 128 dividing in_features (int4: even; int3/int2: a multiple of 8); a number must divide it.
    base_method: "gptq" fits the base on the calibration Gram matrix (needs calibration); "rtn" rounds to
                nearest (no calibration unless the correction is whitened).
    """

    VERSION: ClassVar[int] = 1  # bumped when a field's meaning changes; recorded in checkpoints

    rank: int | None = None
    rank_ratio: float | None = None
    energy: float | None = None
    budget: float | None = None
    bits: int | None = 8
    group_size: int | None = None
    method: str = "svd"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = field(default=(OUTPUT_HEAD,))
    damping: float = 1e-2
    error_feedback: bool = True
    shrinkage: float | str = "auto"
    sequential: bool = True
    base_bits: int | None = None
    base_group_size: int | None = None
    base_method: str = "gptq"
    format: str | None = None  # a registered format's name; None: the format the other knobs ask for

    def __post_init__(self) -> None:
        chosen = [k for k in RANK_KNOBS if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError(
                f"LowRankConfig: set exactly one of rank, rank_ratio, energy, budget; got {chosen or 'none'}"
            )
        # Types first, so a string or a float where an int belongs gets its own message (not "'<' not supported").
        _check_int("rank", self.rank, optional=True)
        for knob in ("rank_ratio", "energy", "budget", "damping"):
            _check_number(knob, getattr(self, knob), optional=knob != "damping")
        _check_int("bits", self.bits, optional=True)
        _check_int("group_size", self.group_size, optional=True)
        for knob in ("error_feedback", "sequential"):
            if not isinstance(getattr(self, knob), bool):
                raise TypeError(f"LowRankConfig: {knob} must be True or False, got {getattr(self, knob)!r}")
        if not isinstance(self.method, str):
            raise TypeError(f"LowRankConfig: method must be a string, got {self.method!r}")
        _check_int("base_bits", self.base_bits, optional=True)
        _check_int("base_group_size", self.base_group_size, optional=True)
        if not isinstance(self.base_method, str):
            raise TypeError(f"LowRankConfig: base_method must be a string, got {self.base_method!r}")

        if self.rank is not None and self.rank <= 0:
            raise ValueError(f"LowRankConfig: rank must be >= 1, got {self.rank}")
        for knob in ("rank_ratio", "energy"):
            value = getattr(self, knob)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"LowRankConfig: {knob} is the fraction kept, in (0, 1]; got {value}")
        # Above the full-rank bytes a budget is clamped by compress_model (with a warning): only it knows the layers.
        if self.budget is not None and not 0 < self.budget < math.inf:
            raise ValueError(f"LowRankConfig: budget must be > 0 and finite, got {self.budget}")
        if not 0 < self.damping < math.inf:
            raise ValueError(f"LowRankConfig: damping must be > 0 and finite, got {self.damping}")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"LowRankConfig: bits must be one of None, 8 or 4, got {self.bits!r}")
        if self.bits == 4 and self.group_size is not None and (self.group_size <= 0 or self.group_size % 2):
            raise ValueError(f"LowRankConfig: group_size must be a positive even number, got {self.group_size}")
        if self.group_size is not None and self.group_size < 0:
            raise ValueError(f"LowRankConfig: group_size must be >= 0, got {self.group_size}")
        if self.method not in ("svd", "whitened"):
            raise ValueError(f"LowRankConfig: method must be 'svd' or 'whitened', got {self.method!r}")
        if self.base_group_size is not None and self.base_group_size <= 0:
            raise ValueError(f"LowRankConfig: base_group_size must be >= 1, got {self.base_group_size}")
        if self.format is not None and not isinstance(self.format, str):
            raise TypeError(f"LowRankConfig: format must be a format's name, got {self.format!r}")
        fmt = self.weight_format  # raises for an unknown or storage-only format
        if fmt.check_config is not None:
            fmt.check_config(self)
        check_shrinkage(self.shrinkage)
        if isinstance(self.include, str) or isinstance(self.exclude, str):
            raise TypeError("LowRankConfig: include and exclude are sequences of patterns, not one string")
        self.include = None if self.include is None else _patterns("include", self.include)
        self.exclude = _patterns("exclude", self.exclude)

    @property
    def weight_format(self) -> WeightFormat:
        """The registered format these knobs ask for."""
        return format_for_config(self)

    @property
    def factors(self) -> QuantScheme:
        """The low-rank factors' scheme (int4 groups run along each factor's feature axis)."""
        return QuantScheme(self.bits, (self.group_size or DEFAULT_GROUP_SIZE) if self.bits == 4 else 0)

    @property
    def needs_grams(self) -> bool:
        """The fit needs the calibration Gram matrices (whitening, a GPTQ base)."""
        fmt = self.weight_format
        return fmt.needs_grams is not None and bool(fmt.needs_grams(self))

    @property
    def needs_calibration(self) -> bool:
        """compress_model needs calibration batches for this config (one name for the one fact)."""
        return self.needs_grams

    def for_layer(self, in_features: int, out_features: int, where: str = "layer") -> LowRankConfig:
        """This config with the group sizes one [out, in] layer stores: an unset one (None) becomes the largest
        width <= DEFAULT_GROUP_SIZE that the storage allows there (quant.fitted_group_size); a set one is kept
        (compress_model checks it and names the layer if it cannot work). The format resolves its own knobs
        (WeightFormat.for_layer), the factors' group size is resolved here."""
        config = self
        if self.group_size is None:
            group = DEFAULT_GROUP_SIZE if self.bits != 4 else fitted_group_size(
                4, (in_features, out_features), f"{where} (factors)")
            config = replace(self, group_size=group)
        fmt = self.weight_format
        return config if fmt.for_layer is None else fmt.for_layer(config, in_features, out_features, where)

    def to_dict(self) -> dict:
        fields = asdict(self)
        if fields["format"] is None:  # the knobs say which format: records stay as they were before the field
            del fields["format"]
        return {"version": self.VERSION, **fields}


SHRINKAGE_WORDS = ("heldout", "auto")


def check_shrinkage(value) -> None:
    """One-line ValueError unless `value` is "heldout", "auto" or a number in [0, 1] (not a bool, not NaN)."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (value in SHRINKAGE_WORDS if isinstance(value, str) else is_number and 0 <= value <= 1):
        raise ValueError(f"LowRankConfig: shrinkage must be 'heldout', 'auto' or a number in [0, 1], got {value!r}")


def _check_int(name: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"LowRankConfig: {name} must be an integer, got {value!r} ({type(value).__name__})")


def _check_number(name: str, value, optional: bool = False) -> None:
    """A real number (int or float; not bool, not a numeric string). NaN and inf fail the range checks."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"LowRankConfig: {name} must be a number, got {value!r} ({type(value).__name__})")


def _patterns(name: str, value) -> tuple[str, ...]:
    try:
        patterns = tuple(value)
    except TypeError:
        raise TypeError(f"LowRankConfig: {name} must be a sequence of glob patterns, got {value!r}") from None
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"LowRankConfig: {name} patterns must be strings, got {patterns!r}")
    return patterns
