"""The low-rank format: W ≈ U·D, rank-r factors (float, int8 per rank component, or int4 group-wise).
The default format: a LowRankConfig without another format's knobs asks for it."""

import triton_lowrank.kernels.configs as configs
from triton_lowrank.core.cpu_kernels import lowrank_cpu
from triton_lowrank.core.factors import LowRankFactors, random_factors
from triton_lowrank.core.format import WeightFormat, register_weight_format
from triton_lowrank.core.ops import problem_for
from triton_lowrank.core.reference import lowrank_reference
from triton_lowrank.formats.lowrank import fit
from triton_lowrank.formats.lowrank.layer import LowRankLinear
from triton_lowrank.formats.lowrank.op import lowrank_matmul

try:
    from triton_lowrank.kernels.launch import launch
except ImportError:  # no Triton on this platform: the reference runs
    launch = None


def problem_key(problem) -> str:
    return ""  # the default format's keys carry no prefix (cache entries written before formats had one stay valid)


def candidates(problem, mode, num_sms=configs.DEFAULT_NUM_SMS, smem_limit=configs.DEFAULT_SMEM_BYTES,
               fused_max_m=configs.FUSED_MAX_M):
    first = configs.lowrank_default_config(problem, num_sms, fused_max_m=fused_max_m)
    if mode == "default":
        return [first]
    return configs.lowrank_candidate_configs(problem, first, mode == "max", num_sms, smem_limit, fused_max_m)


def random_storage(problem, dtype, device) -> LowRankFactors:
    return random_factors(problem.k, problem.n, problem.rank, problem.bits, problem.group_size, dtype, device=device)


LOWRANK = register_weight_format(WeightFormat(
    name="lowrank",
    layer=LowRankLinear,
    default_rank={"budget": 0.5},
    needs_grams=fit.needs_grams,
    check_layer=fit.check_layer,
    rank_bytes=fit.rank_bytes,
    fixed_bytes_label=fit.fixed_bytes_label,
    prepare=fit.whitening,
    heldout_error=fit.heldout_error,
    measure=fit.measure,
    allocate=fit.allocate,
    fit=fit.fit,
    storage=LowRankFactors,
    matmul=lowrank_matmul,
    reference=lowrank_reference,
    cpu=lowrank_cpu,
    problem=problem_for,
    problem_key=problem_key,
    default_config=configs.lowrank_default_config,
    candidates=candidates,
    launch=launch,
    random_storage=random_storage,
))
