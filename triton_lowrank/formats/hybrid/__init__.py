"""The hybrid format: W ≈ Q + U·D, a group-wise int4/int3/int2 base plus a low-rank correction of its error.
A LowRankConfig asks for it with base_bits (and base_group_size, base_method)."""


import triton_lowrank.kernels.configs as configs
from triton_lowrank.core.format import WeightFormat, register_weight_format
from triton_lowrank.formats.hybrid import fit
from triton_lowrank.formats.hybrid.cpu import hybrid_cpu
from triton_lowrank.formats.hybrid.layer import HybridLinear
from triton_lowrank.formats.hybrid.op import hybrid_matmul, hybrid_problem_for
from triton_lowrank.formats.hybrid.storage import HybridWeights, hybrid_reference, random_hybrid_weights

try:
    from triton_lowrank.kernels.launch import launch_hybrid
except ImportError:  # no Triton on this platform: the reference runs
    launch_hybrid = None


def problem_key(problem) -> str:
    return f"base-int{problem.base_bits}-g{problem.base_group_size}-"


def candidates(problem, mode, num_sms=configs.DEFAULT_NUM_SMS, smem_limit=configs.DEFAULT_SMEM_BYTES,
               fused_max_m=configs.FUSED_MAX_M):
    first = configs.hybrid_default_config(problem, num_sms, fused_max_m=fused_max_m)
    if mode == "default":
        return [first]
    return configs.hybrid_candidate_configs(problem, first, mode == "max", num_sms, smem_limit)


def random_storage(problem, dtype, device) -> HybridWeights:
    return random_hybrid_weights(problem.k, problem.n, problem.rank, problem.base_bits, problem.base_group_size,
                                 problem.bits, problem.group_size, dtype, device=device)


HYBRID = register_weight_format(WeightFormat(
    name="hybrid",
    layer=HybridLinear,
    # no default budget: what a hybrid budget must hold depends on the base (its bits and groups)
    rank_needed="--base-bits needs the correction's rank",
    claims_config=fit.claims_config,
    check_config=fit.check_config,
    needs_grams=fit.needs_grams,
    for_layer=fit.for_layer,
    check_layer=fit.check_layer,
    rank_bytes=fit.rank_bytes,
    fixed_bytes_label=fit.fixed_bytes_label,
    prepare=fit.calibration_gram,
    heldout_error=fit.heldout_error,
    measure=fit.measure,
    allocate=fit.allocate_correction_ranks,
    fit=fit.fit,
    storage=HybridWeights,
    matmul=hybrid_matmul,
    reference=hybrid_reference,
    cpu=hybrid_cpu,
    problem=hybrid_problem_for,
    problem_key=problem_key,
    default_config=configs.hybrid_default_config,
    candidates=candidates,
    launch=launch_hybrid,
    random_storage=random_storage,
))
