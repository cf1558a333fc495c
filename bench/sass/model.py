"""The H100 SXM time model. EVERY TIME IT GIVES IS AN ESTIMATE, from constants stated here, not a measurement; where
bench/results/<gpu>/kernels.json measured the same problem the report prints it beside the estimate.

Per kernel, with P programs over S SMs, the busiest SM's share of the grid's work (ceil(P / S) programs), and W warps
resident per SM (CTAs resident per SM, capped by occupancy and by ceil(P / S), times warps per CTA). Per hot loop,
with B its weight bytes on the busiest SM:
  issue    = thread-instructions per weight byte x B / ISSUE_PER_CLK                       (the issue bound)
  hbm      = all its weight bytes / HBM_TBS         (the HBM floor: HBM is shared, an SM may draw more than 1/S)
  latency  = B / bytes_in_flight_per_sm x DRAM_LATENCY,                                    (Little's law)
             bytes_in_flight_per_sm = weight bytes in flight per thread (the SASS order; cp.async: num_stages - 1
             iterations of them) x 32 x W
The bounds add up over the loops of a part of the kernel (all of it; for a programmatic dependent launch, the part
before its griddepcontrol.wait and the part after), with the non-loop instructions of every warp / 4 schedulers
added to the issue bound of the part they sit in, and
  part     = max(issue + DRAM_LATENCY, hbm + DRAM_LATENCY, latency)   (the steady-state bounds pay one round trip
             to fill the pipe; the latency bound already counts every round trip); a part without hot loops: issue
  kernel   = its parts + other bytes (x, scales, output) at HBM + one DRAM_LATENCY more when it has global atomics
             (the reduction's and the ticket's round trip)
A plan (the kernels of one layer call, in launch order) under CUDA graphs:
  GRAPH_LAUNCH_US + kernel 1, then for each programmatic dependent launch (PDL) k, launched as kernel k-1 starts (at
  s): end = max(end of k-1 + PDL_GAP_US, s + pre_k, s + bytes of k-1 and of pre_k at HBM) + post_k,
  where pre_k is the part of kernel k before its griddepcontrol.wait (its
  hot loops there, plus one DRAM_LATENCY when it issues weight loads before the wait and has a hot loop after it: that
  loop's first round trip overlaps) and post_k the rest, never less than one L2_LATENCY (reading what kernel k-1
  wrote) plus post_k's issue. Kernels without PDL add GRAPH_LAUNCH_US + their time.
Eager (no graph): the same with EAGER_LAUNCH_US per launch on the GPU, but never faster than the host can launch:
  max(kernels x HOST_LAUNCH_US, that).
  A dependent launch overlaps only if one of its CTAs fits (registers, warps, shared memory, CTA slots) beside the
  kernel before's resident CTAs on the busiest SM (fits_beside); if not, its CTAs start as the kernel before's leave:
  end = end of k-1 + PDL_GAP_US + kernel k (the hand-off still replaces a launch).
Assumed, not modelled: HBM shared evenly.
"""

from __future__ import annotations

import math

SMS = 132
CLOCK_GHZ = 1.755  # sustained SM clock under load
HBM_TBS = 3.0  # achievable DRAM bandwidth (3.35 TB/s peak)
L2_TBS = 7.0  # L2 read bandwidth for re-read weight tiles
DRAM_LATENCY_NS = 650.0  # loaded round trip
# An L2 hit, loaded (an assumption: unloaded L2-hit pointer chases on recent NVIDIA parts take ~220-340 cycles,
# 0.13-0.19 us at CLOCK_GHZ); what a dependent launch pays to read what the kernel before it wrote
L2_LATENCY_NS = 300.0
ISSUE_PER_CLK = 128  # thread-instructions per SM per clock: 4 schedulers x 32 lanes
GRAPH_LAUNCH_US = 1.0  # a kernel node of a CUDA graph (issue 20: "about 1 us")
PDL_GAP_US = 0.5  # a programmatic dependent launch's hand-off after its primary ends (issue 20: 0.3-0.7 us)
EAGER_LAUNCH_US = 2.0  # GPU-side gap between eager launches when the host keeps ahead
HOST_LAUNCH_US = 6.0  # host time of one Triton launch from Python (a guess; the eager GPU run corrects it)
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_CTAS_PER_SM = 65536, 64, 32
SMEM_PER_SM, SMEM_RESERVED_PER_CTA = 233472, 1024
LATENCY_US = DRAM_LATENCY_NS * 1e-3
L2_LATENCY_US = L2_LATENCY_NS * 1e-3
CLOCKS_PER_US = CLOCK_GHZ * 1e3


def _regs_per_warp(regs: int) -> int:
    """Registers a warp holds: per-thread registers x 32, allocated 256 at a time."""
    return math.ceil(max(regs, 1) * 32 / 256) * 256


def occupancy(regs: int, warps: int, shared: int) -> int:
    """CTAs per SM an H100 can hold: registers (256-per-warp allocation), warps, shared memory, CTA slots."""
    by_regs = REGS_PER_SM // (_regs_per_warp(regs) * warps)
    by_warps = MAX_WARPS_PER_SM // warps
    by_smem = SMEM_PER_SM // (shared + SMEM_RESERVED_PER_CTA)
    return max(0, min(by_regs, by_warps, by_smem, MAX_CTAS_PER_SM))


def resident_ctas(r: dict) -> int:
    """CTAs of kernel r resident on its busiest SM: occupancy, capped by its share of the grid."""
    return max(1, min(r["ctas_per_sm"], math.ceil(r["programs"] / SMS)))


def fits_beside(before: dict, r: dict) -> bool:
    """One CTA of kernel r fits on an SM beside kernel `before`'s resident CTAs (its busiest SM's)."""
    def regs(k: dict) -> int:
        return _regs_per_warp(k["regs"]) * k["num_warps"]

    resident = resident_ctas(before)
    return (resident * regs(before) + regs(r) <= REGS_PER_SM
            and resident * before["num_warps"] + r["num_warps"] <= MAX_WARPS_PER_SM
            and resident * (before["shared_bytes"] + SMEM_RESERVED_PER_CTA) + r["shared_bytes"]
            + SMEM_RESERVED_PER_CTA <= SMEM_PER_SM
            and resident + 1 <= MAX_CTAS_PER_SM)


def resident_warps(r: dict) -> int:
    return resident_ctas(r) * r["num_warps"]


def _after_wait(r: dict, loop: dict) -> bool:
    return bool(r.get("launch_pdl") and loop.get("after_wait"))


def estimate_kernel(r: dict) -> dict:
    """The bounds and times of one kernel record (analyze_launch's), in microseconds; ESTIMATES. Adds each hot loop's
    bytes_in_flight_per_sm and its bounds to the loop's dict."""
    programs = r["programs"]
    per_sm_programs = math.ceil(programs / SMS)
    share = per_sm_programs / max(programs / SMS, 1e-9) / SMS  # this SM's fraction of the grid's work
    warps = resident_warps(r)
    parts = {False: [0.0, 0.0, 0.0], True: [0.0, 0.0, 0.0]}  # before / after the wait: issue, HBM, latency bounds
    for loop in r["hot_loops"]:
        b = loop["weight_bytes_streamed"] * share
        if loop.get("async_copies"):  # cp.async stages: num_stages - 1 iterations of copies ahead of the dot
            ahead = max(1, (r.get("num_stages") or 2) - 1)
            loop["weight_bytes_in_flight_per_thread"] = loop["weight_bytes_per_thread"] * ahead
            loop["weight_loads_before_first_use"] = sum(loop["weight_loads"].values()) * ahead
        loop["bytes_in_flight_per_sm"] = int(loop["weight_bytes_in_flight_per_thread"] * 32 * warps)
        bounds = (loop["instructions_per_weight_byte"] * b / ISSUE_PER_CLK / CLOCKS_PER_US,
                  loop["weight_bytes_streamed"] / (HBM_TBS * 1e6),
                  b / max(loop["bytes_in_flight_per_sm"], 1) * LATENCY_US)
        loop.update(issue_us=round(bounds[0], 3), hbm_us=round(bounds[1], 3), latency_us=round(bounds[2], 3))
        part = parts[_after_wait(r, loop)]
        for k in range(3):
            part[k] += bounds[k]
    per_instruction = r["num_warps"] * per_sm_programs / 4 / CLOCKS_PER_US  # every warp, 4 schedulers
    after = r.get("non_loop_instructions_after_wait", 0) if r.get("launch_pdl") else 0
    parts[False][0] += (r["non_loop_instructions"] - after) * per_instruction  # prologue and epilogue, by position
    parts[True][0] += after * per_instruction

    def bound(issue: float, hbm: float, latency: float, loads: bool) -> float:
        return max(issue + LATENCY_US, hbm + LATENCY_US, latency) if loads else issue

    pre, post = (bound(*parts[after], any(_after_wait(r, lp) == after for lp in r["hot_loops"]))
                 for after in (False, True))
    if r.get("launch_pdl") and post:  # the part after griddepcontrol.wait
        if r.get("weight_loads_before_wait") and any(_after_wait(r, lp) for lp in r["hot_loops"]):
            pre, post = pre + LATENCY_US, post - LATENCY_US  # its loop's first round trip overlaps the kernel before
        # but its first use of what the kernel before wrote (hidden, partials) is a dependent read, an L2 hit
        post = max(post, L2_LATENCY_US + parts[True][0])
    weight_unique = sum(lp["weight_bytes_streamed"] for lp in r["hot_loops"]) - r["weight_reread_bytes"]
    other = max(0.0, r["unique_bytes"] - weight_unique) / (HBM_TBS * 1e6) + r["weight_reread_bytes"] / (L2_TBS * 1e6)
    body = pre + post + other + LATENCY_US * (r["global_atomics"] > 0)
    issue, hbm, latency = (parts[False][k] + parts[True][k] for k in range(3))
    return {"issue_bound_us": round(issue, 2), "hbm_floor_us": round(r["unique_bytes"] / (HBM_TBS * 1e6), 2),
            "latency_bound_us": round(latency, 2), "estimate_us": round(body, 2),
            "pre_wait_us": round(pre if r.get("launch_pdl") else 0.0, 2)}


def estimate_plan(records: list[dict]) -> dict:
    """A layer call's kernels in launch order: CUDA-graph and eager times (ESTIMATES), PDL overlap modelled."""
    def run(launch_us: float) -> float:
        t = started = 0.0  # now; when the previous kernel started
        previous_bytes = 0.0
        for i, r in enumerate(records):
            body, pre = r["estimate_us"], r["pre_wait_us"]
            if r.get("launch_pdl") and t:
                if fits_beside(records[i - 1], r):
                    # launched while the previous kernel runs: its pre-wait part overlaps it, sharing HBM
                    pre_bytes = r["unique_bytes"] * pre / max(body, 1e-9)
                    shared = (previous_bytes + pre_bytes) / (HBM_TBS * 1e6)
                    t = max(t + PDL_GAP_US, started + pre, started + shared) + body - pre
                else:  # no room beside the kernel before: its CTAs start as those leave
                    t += PDL_GAP_US + body
                    started = t - body
            else:
                t += launch_us
                started = t
                t += body
            previous_bytes = r["unique_bytes"]
        return t

    graph = run(GRAPH_LAUNCH_US)
    eager = max(len(records) * HOST_LAUNCH_US, run(EAGER_LAUNCH_US))
    return {"plan_graph_us": round(graph, 2), "plan_eager_us": round(eager, 2)}
