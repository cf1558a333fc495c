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
A kernel with a dependent-launch wait (PDL) is three things (estimate_kernel; finish):
  pre      = the part before the wait (its hot loops, if any: the hybrid gemv's base);
  prefetch = the weight bytes its first wave of CTAs loads before the wait outside any loop (from the SASS): the head of
             the stream of its loops after the wait, in flight while the kernel before runs;
  after the wait (released at w), with HBM busy until q with what was asked of it before (below):
  end      = max(w + first data + issue after the wait, w + latency bound of the rest, q,
                 max(w + DRAM_LATENCY, q) + (bytes after the wait - prefetch) / HBM_TBS) + other bytes
             (the last term only while bytes remain after the prefetch),
             first data = L2_LATENCY (what the kernel before wrote, an L2 hit) or, with a loop after the wait and no
             prefetch, DRAM_LATENCY (its first weights); the stream after the wait starts a round trip after the wait,
             or as HBM finishes the queue before it, whichever is later.
A plan (the kernels of one layer call, in launch order) under CUDA graphs: GRAPH_LAUNCH_US + kernel 1, then each
PDL kernel k, launched as kernel k-1 starts (at s), its part before the wait beside it:
  w = max(end of k-1 + PDL_GAP_US, s + pre_k, s + DRAM_LATENCY + (bytes of k-1 + pre_k's loop bytes) / HBM_TBS)
  q = s + DRAM_LATENCY + (bytes of k-1 + pre_k's loop bytes + prefetch_k) / HBM_TBS
  (the kernel before's bytes are served first: they were asked for first; a prefetch as long as the hand-off plus a
  round trip keeps HBM busy across it, and the plan ends at its floor). Kernels without PDL add GRAPH_LAUNCH_US +
  their time; a PDL kernel alone (estimate_us) is the same with no kernel before (w = its pre).
Eager (no graph): the same with EAGER_LAUNCH_US per launch on the GPU, but never faster than the host can launch:
  max(kernels x HOST_LAUNCH_US, that).
  A dependent launch overlaps only if one of its CTAs fits (registers, warps, shared memory, CTA slots) beside the
  kernel before's resident CTAs on the busiest SM (fits_beside); if not, its CTAs start as the kernel before's leave:
  end = end of k-1 + PDL_GAP_US + kernel k (the hand-off still replaces a launch).
Assumed, not modelled: HBM shared evenly across SMs; requests served in the order asked (FIFO: were HBM shared evenly
between phase 1 and phase 2's prefetch instead, the prefetch would delay phase 1 by its own length and gain nothing);
SHFL issuing at a quarter of the FP32 rate (every instruction counts the same); an epilogue after the last weight byte
of an HBM-bound loop.
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
    bytes_in_flight_per_sm and its bounds to the loop's dict. A kernel with a dependent-launch wait also gets the
    parts finish() combines: pre_wait_us, post_wait_us, stream_after_wait_us (None: no hot loop after the wait),
    pre_wait_loop_bytes, prefetch_bytes and other_us."""
    programs = r["programs"]
    per_sm_programs = math.ceil(programs / SMS)
    share = per_sm_programs / max(programs / SMS, 1e-9) / SMS  # this SM's fraction of the grid's work
    warps = resident_warps(r)
    pdl = bool(r.get("launch_pdl"))
    parts = {False: [0.0, 0.0, 0.0], True: [0.0, 0.0, 0.0]}  # before / after the wait: issue, HBM, latency bounds
    streamed = {False: 0.0, True: 0.0}
    first_after = None  # the first hot loop after the wait: the stream a prefetch starts
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
        after = _after_wait(r, loop)
        streamed[after] += loop["weight_bytes_streamed"]
        if after and first_after is None:
            first_after = loop
        for k in range(3):
            parts[after][k] += bounds[k]
    per_instruction = r["num_warps"] * per_sm_programs / 4 / CLOCKS_PER_US  # every warp, 4 schedulers
    after = r.get("non_loop_instructions_after_wait", 0) if pdl else 0
    parts[False][0] += (r["non_loop_instructions"] - after) * per_instruction  # prologue and epilogue, by position
    parts[True][0] += after * per_instruction
    issue, hbm, latency = (parts[False][k] + parts[True][k] for k in range(3))
    # The prefetch: weight loads issued before the wait outside any loop by the CTAs resident at the start (the first
    # wave), the head of the stream of the loops after the wait. It is in flight while the kernel before runs, so it
    # leaves the stream after the wait (HBM bound: its bytes; latency bound: its bytes on the busiest SM).
    prefetch = 0.0
    if first_after is not None:
        per_thread = r.get("weight_bytes_prefetched_per_thread", 0)
        prefetch = min(streamed[True], per_thread * 32 * r["num_warps"] * min(programs, SMS * resident_ctas(r)))
        parts[True][1] -= prefetch / (HBM_TBS * 1e6)
        parts[True][2] = max(0.0, parts[True][2] - per_thread * 32 * warps
                             / max(first_after["bytes_in_flight_per_sm"], 1) * LATENCY_US)

    def bound(issue: float, hbm: float, latency: float, loads: bool) -> float:
        return max(issue + LATENCY_US, hbm + LATENCY_US, latency) if loads else issue

    weight_unique = sum(lp["weight_bytes_streamed"] for lp in r["hot_loops"]) - r["weight_reread_bytes"]
    other = max(0.0, r["unique_bytes"] - weight_unique) / (HBM_TBS * 1e6) + r["weight_reread_bytes"] / (L2_TBS * 1e6)
    other += LATENCY_US * (r["global_atomics"] > 0)  # the reduction's and the ticket's round trip
    out = {"issue_bound_us": round(issue, 2), "hbm_floor_us": round(r["unique_bytes"] / (HBM_TBS * 1e6), 2),
           "latency_bound_us": round(latency, 2)}
    if not pdl:
        return {**out, "estimate_us": round(bound(*parts[False], bool(r["hot_loops"])) + other, 2),
                "pre_wait_us": 0.0}
    pre = bound(*parts[False], streamed[False] > 0)
    # after the wait the issue starts on its first data: what the kernel before wrote (hidden, partials: a dependent
    # read, an L2 hit) and, for a hot loop after the wait, its first weights (prefetched, or a DRAM round trip away);
    # the round trips of the rest of the stream (latency bound) and the stream itself (finish)
    first_data = LATENCY_US if first_after is not None and not prefetch else L2_LATENCY_US
    post = max(first_data + parts[True][0], parts[True][2] if first_after is not None else 0.0)
    parts_out = {"pre_wait_us": round(pre, 3), "post_wait_us": round(post, 3),
                 "stream_after_wait_us": None if first_after is None else round(parts[True][1], 3),
                 "pre_wait_loop_bytes": streamed[False], "prefetch_bytes": prefetch, "other_us": round(other, 3)}
    # run alone (no kernel before): the wait releases as the part before it ends
    alone = finish(parts_out, pre, LATENCY_US + (streamed[False] + prefetch) / (HBM_TBS * 1e6))
    return {**out, **parts_out, "estimate_us": round(alone, 2)}


def finish(r: dict, wait_at: float, queue_free: float) -> float:
    """When kernel r ends, its wait released at wait_at and HBM busy until queue_free with what was asked of it before
    (the kernel before's bytes, r's part before the wait and its prefetch): the part after the wait, the queue, and
    the rest of the stream, which starts a round trip after the wait or as the queue frees, whichever is later."""
    end = max(wait_at + r["post_wait_us"], queue_free)  # (what it prefetched has arrived)
    if r["stream_after_wait_us"]:  # (None: no hot loop after the wait; 0: the prefetch was all of it)
        end = max(end, max(wait_at + LATENCY_US, queue_free) + r["stream_after_wait_us"])
    return end + r["other_us"]


def estimate_plan(records: list[dict]) -> dict:
    """A layer call's kernels in launch order: CUDA-graph and eager times (ESTIMATES), PDL overlap modelled."""
    hbm_us_per_byte = 1 / (HBM_TBS * 1e6)

    def run(launch_us: float) -> float:
        t = started = 0.0  # now; when the previous kernel started
        previous_bytes = 0.0
        for i, r in enumerate(records):
            if r.get("launch_pdl") and t and fits_beside(records[i - 1], r):
                # launched as the previous kernel starts: its part before the wait runs beside it, sharing HBM, the
                # previous kernel's bytes first (asked for first); the wait releases after the hand-off
                before = previous_bytes + r["pre_wait_loop_bytes"]
                wait_at = max(t + PDL_GAP_US, started + r["pre_wait_us"],
                              started + LATENCY_US + before * hbm_us_per_byte)
                t = finish(r, wait_at, started + LATENCY_US + (before + r["prefetch_bytes"]) * hbm_us_per_byte)
            elif r.get("launch_pdl") and t:  # no room beside the kernel before: its CTAs start as those leave
                t += PDL_GAP_US + r["estimate_us"]
                started = t - r["estimate_us"]
            else:
                t += launch_us
                started = t
                t += r["estimate_us"]
            previous_bytes = r["unique_bytes"]
        return t

    graph = run(GRAPH_LAUNCH_US)
    eager = max(len(records) * HOST_LAUNCH_US, run(EAGER_LAUNCH_US))
    return {"plan_graph_us": round(graph, 2), "plan_eager_us": round(eager, 2)}
