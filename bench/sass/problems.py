"""The problems the report compiles: each as the launcher specializes it, with the default (tuner-first) config."""

from __future__ import annotations

from dataclasses import dataclass

GPT2_SMALL = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
GPT2_XL = [(1600, 4800), (1600, 1600), (1600, 6400), (6400, 1600)]
LLAMA = (4096, 11008)
DEFAULT_SHAPES = [(768, 3072), (1600, 6400), (6400, 1600), LLAMA]  # lean: the default run stays < 3 min
M_VALUES = (1, 16, 4096)
INT4_GROUP = 128


def bench_rank(k: int, n: int) -> int:
    """The ranks of bench/kernel_bench.py: rank ratio 0.25 of min(in, out) (r=400 for XL c_fc, 1024 for 4096)."""
    return max(1, int(0.25 * min(k, n)))


@dataclass(frozen=True)
class Spec:
    m: int
    k: int
    n: int
    rank: int
    bits: int | None
    group_size: int = 0  # storage group size: 0 unless int4
    base_bits: int | None = None  # the hybrid format: a base of these bits plus the rank-r correction
    base_group_size: int = 0
    format: str = "lowrank"  # the registered weight format whose kernels run it

    @property
    def hybrid(self) -> bool:
        return self.format == "hybrid"

    def label(self) -> str:
        bits = "fp16" if self.bits is None else f"int{self.bits}" + (f" g{self.group_size}" if self.bits == 4 else "")
        base = f"int{self.base_bits} g{self.base_group_size} + " if self.base_bits else ""
        return f"{self.k}->{self.n} {base}r={self.rank} {bits} M={self.m}"

    def problem(self) -> dict:
        return {"M": self.m, "N": self.n, "K": self.k, "R": self.rank, "bits": self.bits, "group_size": self.group_size,
                "base_bits": self.base_bits, "base_group_size": self.base_group_size}

    @classmethod
    def of(cls, p: dict) -> Spec:
        return cls(p["M"], p["K"], p["N"], p["R"], p["bits"], p["group_size"], p.get("base_bits"),
                   p.get("base_group_size", 0), "hybrid" if p.get("base_bits") else "lowrank")


def spec(m: int, k: int, n: int, bits: int | None, rank: int | None = None) -> Spec:
    return Spec(m, k, n, rank or bench_rank(k, n), bits, INT4_GROUP if bits == 4 else 0)


def hybrid_spec(m: int, k: int, n: int, base_bits: int, rank: int = 32, bits: int | None = 8) -> Spec:
    """The hybrid format of issue 10: a base in groups of 128 (64 where 128 does not divide `in`, as GPT-2 XL's
    1600) plus a rank-`rank` correction (int4 factors: g128)."""
    return Spec(m, k, n, rank, bits, INT4_GROUP if bits == 4 else 0, base_bits, 128 if k % 128 == 0 else 64, "hybrid")


# The proxy targets of issues 9 and 10 (default M=1 configs) and issue 20's (M=1 and the hybrid at M=16): checked by
# tests/test_sass_report.py.
PROXY_PROBLEMS = [spec(1, 1600, 6400, 8, 400), spec(1, 4096, 11008, 8, 1024), spec(1, 4096, 11008, 4, 1024),
                  hybrid_spec(1, 4096, 11008, 4), hybrid_spec(16, 4096, 11008, 4)]
# Small layers (issue 20: "small layers get a one-launch path"): their default plan is decode_one_launch_kernel
# (configs.one_launch_is_default: `down` <= 20 KB of int8, 12 KB of float, 8 KB of int4); the report compiles the
# two-launch plan beside it (two_launch_config) and the slow test asserts one launch estimates no slower. SmolLM2-135M's
# MLP (576 -> 1536) at int8 rank 32, the embedded GPT-2's c_fc (256 -> 1024) at int8 rank 64, float rank 16 and int4
# rank 64.
SMALL_PROBLEMS = [spec(1, 576, 1536, 8, 32), spec(1, 256, 1024, None, 16), spec(1, 256, 1024, 8, 64),
                  spec(1, 256, 1024, 4, 64)]
HYBRID_PROBLEMS = [hybrid_spec(m, *LLAMA, base_bits) for base_bits in (4, 3, 2) for m in (1, 16)] + [
    hybrid_spec(4096, *LLAMA, 4), hybrid_spec(1, 768, 3072, 4), hybrid_spec(1, 1600, 6400, 4)]


def default_problems(shapes) -> list[Spec]:
    return [spec(m, k, n, bits) for (k, n) in shapes for bits in (8, 4) for m in M_VALUES]


def configs_for(s: Spec, everything: bool) -> list:
    """The default config (what the tuner tries first), or every "max" candidate."""
    from triton_lowrank.kernels.configs import Problem

    from triton_lowrank.core.autotune import candidate_configs, default_config

    p = Problem(s.m, s.n, s.k, s.rank, s.bits, s.group_size, 2, s.base_bits, s.base_group_size, s.format)
    return candidate_configs(p, "max") if everything else [default_config(p)]


def two_launch_config(s: Spec):
    """The two-launch CUDA-core decode plan of a small problem (what it would run without the one-launch rule)."""
    from triton_lowrank.kernels.configs import DEFAULT_NUM_SMS, Problem, two_launch_default_config

    p = Problem(s.m, s.n, s.k, s.rank, s.bits, s.group_size, 2)
    return two_launch_default_config(p, DEFAULT_NUM_SMS)
