"""One problem end to end (record, compile, disassemble, analyze, estimate), measurements beside the estimates, the
printed table and the command line of bench/sass_report.py."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

from . import model
from .compile import Launch, compile_launch, record_launches
from .disasm import disassemble, param_offsets, resources, tool
from .hotloops import analyze_sass
from .problems import (
    DEFAULT_SHAPES,
    GPT2_SMALL,
    GPT2_XL,
    HYBRID_PROBLEMS,
    LLAMA,
    PROXY_PROBLEMS,
    SMALL_PROBLEMS,
    Spec,
    configs_for,
    default_problems,
    spec,
    two_launch_config,
)
from .targets import KNOWN_MISSES, one_launch_plan_us, proxy_checks

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def rereads(name: str, pname: str, launch: Launch) -> int:
    """How many times a kernel reads each weight byte (programs sharing it along another grid axis), by kernel name
    and weight parameter name. Kernels not listed read each weight byte once."""
    kw, grid = launch.kwargs, launch.grid
    if name == "fused_kernel":
        return kw["SPLIT_N"] if pname.startswith("down") else kw["SPLIT_K"]
    if name in ("shrink_kernel", "expand_kernel", "hybrid_tile_kernel"):
        return grid[0]  # every M block streams the whole factor (the base)
    if name == "decode_one_launch_kernel":  # every program re-reads all of `down` (from L2), its slice of up_t once
        return grid[0] * grid[1] if pname.startswith("down") else grid[1]
    if name.startswith("decode_") or name == "hybrid_gemv_kernel":
        return grid[-1]  # every M block streams its factor (the base) once
    return 1


def weight_arguments(launch: Launch, pnames: list[str]) -> list[tuple[str, object]]:
    """(parameter name, tensor) of each weight tensor once, under the first parameter it is passed as: launch.py passes
    a factor again as the stand-in for an absent argument (float factors have no scales), which the kernel never
    reads (counted twice, `down` re-read by every one-launch program made its L2 traffic twice what it is)."""
    first: dict[int, tuple[str, object]] = {}
    for i, a in enumerate(launch.args):
        if launch.roles.get(i) == "weight":
            first.setdefault(id(a), (pnames[i], a))
    return list(first.values())


def analyze_launch(s: Spec, launch: Launch, workdir: str) -> dict:
    import torch
    import triton

    compiled, ordinal_index = compile_launch(launch)
    roles = {o: launch.roles.get(i, "scalar") for o, i in ordinal_index.items()}
    name = launch.fn.__name__
    path = os.path.join(workdir, f"{name}-{os.getpid()}-{id(compiled)}.cubin")
    with open(path, "wb") as fh:
        fh.write(compiled.asm["cubin"])
    try:
        res = resources(path)
        sass = disassemble(path)
        if os.environ.get("SASS_REPORT_DUMP"):  # keep the SASS and Triton IR for reading
            stem = Path(os.environ["SASS_REPORT_DUMP"]) / f"{s.label().replace(' ', '_').replace('>', '')}-{name}"
            stem.parent.mkdir(parents=True, exist_ok=True)
            stem.with_suffix(".sass").write_text(sass)
            stem.with_suffix(".ttgir").write_text(compiled.asm["ttgir"])
        sass_info = analyze_sass(sass, param_offsets(path), roles)
    finally:
        os.unlink(path)
    meta = compiled.metadata
    warps = meta.num_warps
    shared = int(getattr(meta, "shared", 0)) + res["static_shared"]
    programs = math.prod(launch.grid)
    ctas = model.occupancy(res["regs"], warps, shared)
    pnames = list(launch.fn.arg_names)
    weight_args = weight_arguments(launch, pnames)
    streamed = sum(_tensor_bytes(a) * rereads(name, p, launch) for p, a in weight_args)
    weight_bytes = sum(_tensor_bytes(a) for _, a in weight_args)
    # each hot loop streams the weights its loads derive from (a weight read by several loops is shared out)
    loops = sass_info["hot_loops"]
    for loop in loops:
        loop["weight_tensors"] = [pnames[ordinal_index[o]] for o in loop.pop("weight_params")]
    for loop in loops:
        loop["weight_bytes_streamed"] = sum(
            _tensor_bytes(launch.args[pnames.index(p)]) * rereads(name, p, launch)
            / sum(p in lp["weight_tensors"] for lp in loops) for p in loop["weight_tensors"])
    # each tensor once: a stand-in for an absent argument (the int4 base's zero point is its scale tensor) is the same
    # memory
    counted = {id(a): a for i, a in enumerate(launch.args)
               if isinstance(a, torch.Tensor) and launch.roles.get(i) in ("weight", "scale", "x", "out", "bias")}
    unique = sum(_tensor_bytes(a) for a in counted.values())
    record = {
        "kernel": name, "triton": triton.__version__, "grid": list(launch.grid), "programs": programs,
        "num_warps": warps, "num_stages": getattr(meta, "num_stages", None),
        "launch_pdl": bool(getattr(meta, "launch_pdl", False)),
        "regs": res["regs"],
        "spills": res["local"] + res["stack"], "shared_bytes": shared, "ctas_per_sm": ctas,
        "resident_ctas_per_sm": min(ctas, programs // model.SMS) if programs >= model.SMS else (1 if programs else 0),
        "waves": round(programs / (model.SMS * max(ctas, 1)), 2), **sass_info,
        "weight_bytes": weight_bytes, "weight_bytes_streamed": streamed, "unique_bytes": unique,
        "weight_reread_bytes": max(0, streamed - weight_bytes),
    }
    record.update(model.estimate_kernel(record))
    return record


def report_problem(s: Spec, config, workdir: str) -> list[dict]:
    records = []
    for launch in record_launches(s, config):
        rec = analyze_launch(s, launch, workdir)
        rec["problem"] = s.problem()
        rec["config"] = asdict(config)
        records.append(rec)
    plan = model.estimate_plan(records)
    for rec in records:
        rec.update(plan)
        rec["problem_estimate_us"] = plan["plan_graph_us"]
    return records


def reestimate(records: list[dict]) -> list[dict]:
    """Stored records (a report's --json) with today's model applied: each kernel, then each plan (a problem's
    consecutive records with one config, in launch order)."""
    plans: list[list[dict]] = []
    for rec in records:
        if "error" in rec:
            continue
        rec.update(model.estimate_kernel(rec))
        same = plans and (plans[-1][0]["problem"], plans[-1][0]["config"]) == (rec["problem"], rec["config"])
        if same and rec["kernel"] not in [r["kernel"] for r in plans[-1]]:
            plans[-1].append(rec)
        else:
            plans.append([rec])
    for plan in plans:
        estimate = model.estimate_plan(plan)
        for rec in plan:
            rec.update(estimate)
            rec["problem_estimate_us"] = estimate["plan_graph_us"]
    return records


def _work(job) -> list[dict]:
    s, config, is_default, workdir = job
    try:
        records = report_problem(s, config, workdir)
        for rec in records:
            rec["default_config"] = is_default  # candidate_configs puts the heuristic (the tuner's default) first
        return records
    except Exception as err:  # noqa: BLE001 - a config the compiler rejects is reported, not fatal
        return [{"problem": s.problem(), "config": str(config), "error": f"{type(err).__name__}: {err}"}]


# ---- measurements --------------------------------------------------------------------------------
def load_measurements() -> dict:
    """(K, N, R, bits, M, path) -> (us, gpu) from every bench/results/<gpu>/kernels.json."""
    found = {}
    for path in sorted(RESULTS.glob("*/kernels.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        gpu = data.get("env", {}).get("device", path.parent.name)
        if path.parent.name == "dry-run" or str(gpu).startswith("cpu"):
            continue  # interpreter timings measure numpy, not a GPU
        for row in data.get("rows", []):
            for key, value in row.items():
                if key.endswith("_us") and key not in ("cublas_us", "unfused_us"):
                    bits = None if row["bits"] == 16 else row["bits"]
                    found[(row["in"], row["out"], row["rank"], bits, row["m"], key[:-3])] = (value, gpu)
    return found


def attach_measurements(records: list[dict], measured: dict) -> None:
    for rec in records:
        if "error" in rec:
            continue
        p, c = rec["problem"], rec["config"]
        hit = measured.get((p["K"], p["N"], p["R"], p["bits"], p["M"], c["path"]))
        if hit:
            rec["measured_us"], rec["measured_gpu"] = hit


# ---- output ------------------------------------------------------------------------------------------
def print_table(records: list[dict]) -> None:
    versions = sorted({r.get("triton", "unknown") for r in records if "error" not in r})
    print(f"static sm_90 SASS compiled by Triton {', '.join(versions) or 'unknown'} (its bundled ptxas)")
    head = (f"{'problem':<46} {'path':<7} {'kernel':<22} {'grid':>6} {'regs':>4} {'spill':>5} {'smem':>6} "
            f"{'CTA/SM':>6} | {'loop insts':>10} {'B/thr':>6} {'inst/B':>6} {'loads':<20} {'use@':>4} {'KB/SM':>6} "
            f"{'I2F':>4} {'SHFL':>4} {'BAR':>4} {'pf':>2} | {'issue':>6} {'HBM':>6} {'lat':>6} {'est us':>7} "
            f"{'graph':>6} {'eager':>6} {'measured':>9}")
    print(head)
    print("-" * len(head))
    for r in records:
        label = Spec.of(r["problem"]).label()
        if "error" in r:
            print(f"{label:<46} ERROR {r['error'][:150]}")
            continue
        c = r["config"]
        loops = r["hot_loops"] or [None]
        for i, lp in enumerate(loops):
            left = " " * 112
            if i == 0:
                left = (f"{label:<46} {c['path']:<7} {r['kernel']:<22} {r['programs']:>6} {r['regs']:>4} "
                        f"{r['spills']:>5} {r['shared_bytes']:>6} {r['ctas_per_sm']:>2}/{r['resident_ctas_per_sm']:<3}")
            if lp:
                loads = ",".join(f"{n}x{op.replace('LDG.E.', '').replace('LDG.E', '32')}"
                                 for op, n in sorted(lp["weight_loads"].items()))
                mid = (f" | {lp['sass_instructions']:>10} {lp['weight_bytes_per_thread']:>6.0f} "
                       f"{lp['instructions_per_weight_byte']:>6.2f} {loads:<20.20} "
                       f"{lp['weight_loads_before_first_use']:>4} {lp['bytes_in_flight_per_sm'] / 1024:>6.1f} "
                       f"{lp['i2f']:>4} {lp['shfl']:>4} {lp['bar']:>4} {'y' if lp['prefetched'] else 'n':>2}")
            else:
                mid = f" | {'(no hot loop)':>10}" + " " * 66
            right = ""
            if i == 0:
                meas = f"{r['measured_us']:.2f}" if "measured_us" in r else "-"
                right = (f" | {r['issue_bound_us']:>6.2f} {r['hbm_floor_us']:>6.2f} {r['latency_bound_us']:>6.2f} "
                         f"{r['estimate_us']:>7.2f} {r['plan_graph_us']:>6.2f} {r['plan_eager_us']:>6.2f} {meas:>9}")
            print(left + mid + right)
    print("\nCTA/SM = occupancy limit / resident for this grid; B/thr = weight bytes per thread per loop iteration; "
          "use@ = weight loads in flight at their first use (SASS order); KB/SM = weight bytes in flight per SM; "
          "pf = weight loads prefetched a loop iteration ahead.\nAll times are ESTIMATES (microseconds) from the H100 "
          "model in bench/sass/model.py, not measurements: issue / HBM / lat = the kernel's issue bound, HBM floor "
          "and Little's-law latency bound; est us = the kernel without launch; graph / eager = the plan (all its "
          "kernels, PDL overlap modelled) under CUDA graphs / eager launches; measured = bench/results/<gpu>/"
          "kernels.json for the same path, where present.")


def print_hybrid_estimates(records: list[dict]) -> None:
    """Issue 10's speed targets, as far as a CPU can speak to them: each hybrid plan's ESTIMATE beside the time the
    same bytes take at HBM_TBS for the base alone (the floor of the kernel without its correction) and for fp16
    weights (cuBLAS F.linear's floor at decode M)."""
    plans = {}
    for r in records:
        p = r["problem"]
        if "error" not in r and p.get("base_bits"):
            plans[json.dumps(p, sort_keys=True)] = (p, r["plan_graph_us"])
    if not plans:
        return
    print("\nHybrid plans (ESTIMATES; floors = bytes / HBM_TBS):")
    print(f"  {'problem':<46} {'graph est us':>11} {'base floor':>10} {'fp16 floor':>10} {'est/base':>8} "
          f"{'est/fp16':>8}")
    for p, est in plans.values():
        base = p["N"] * p["K"] * p["base_bits"] / 8 + p["N"] * p["K"] // p["base_group_size"] * 4
        fp16 = 2 * p["N"] * p["K"]
        base_us, fp16_us = base / (model.HBM_TBS * 1e6), fp16 / (model.HBM_TBS * 1e6)
        label = Spec.of(p).label()
        print(f"  {label:<46} {est:>11.2f} {base_us:>10.2f} {fp16_us:>10.2f} {est / base_us:>8.2f} "
              f"{est / fp16_us:>8.2f}")


def print_one_launch(records: list[dict]) -> None:
    """The small layers' plans, one launch (their default) against two (ESTIMATES, CUDA graphs and eager)."""
    rows = [(Spec.of(s.problem()).label(), one, two, one_launch_plan_us(records, s, True, "plan_eager_us"),
             one_launch_plan_us(records, s, False, "plan_eager_us")) for s in SMALL_PROBLEMS
            if (one := one_launch_plan_us(records, s, True)) and (two := one_launch_plan_us(records, s, False))]
    if rows:
        print("\nSmall layers, one launch against two (plan ESTIMATES, us; CUDA graphs, then eager):")
        for label, one, two, one_eager, two_eager in rows:
            print(f"  {label:<46} one launch {one:>6.2f}   two launches {two:>6.2f}   {one / two:>5.2f}x   "
                  f"eager {one_eager:>6.2f} against {two_eager:>6.2f}")


def main(argv=None, description: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/sass_report.py", description=description or __doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="every 'max' candidate config, not just the default")
    parser.add_argument("--shapes", choices=("default", "all"), default="default",
                        help="default: GPT-2 small c_fc, XL c_fc and c_proj, 4096->11008; all: every GPT-2 layer")
    parser.add_argument("--proxy", action="store_true", help="only the proxy problems; exit 1 if a target fails")
    parser.add_argument("--hybrid", action="store_true", help="only the hybrid problems (with --all: to pick configs)")
    parser.add_argument("--json", type=Path, help="write the records here")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--dry-run", action="store_true", help="one small problem (GPT-2 c_fc int8 M=1): the plumbing")
    parser.add_argument("--reestimate", type=Path, metavar="JSON",
                        help="no compiling: apply today's time model to the SASS facts stored in JSON (an earlier "
                             "--json), print the table, and write the result to --json")
    args = parser.parse_args(argv)
    if args.reestimate:
        records = reestimate(json.loads(args.reestimate.read_text()))
        print_table(records)
        if args.json:
            args.json.write_text(json.dumps(records, indent=1, default=str))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the report compiles for sm_90")
    missing = [t for t in ("cuobjdump", "nvdisasm") if tool(t) is None]
    if missing:
        print(f"SKIP: {', '.join(missing)} not found (Triton's NVIDIA backend ships them)")
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns unless it is set; 1 is the default
    if args.dry_run:
        problems = [spec(1, 768, 3072, 8)]
    elif args.proxy:
        problems = PROXY_PROBLEMS + SMALL_PROBLEMS
    elif args.hybrid:
        problems = [s for s in HYBRID_PROBLEMS if s.m == 1 or not args.all]
    else:
        problems = default_problems(DEFAULT_SHAPES if args.shapes == "default" else [*GPT2_SMALL, *GPT2_XL, LLAMA])
        problems += [s for s in dict.fromkeys(PROXY_PROBLEMS + SMALL_PROBLEMS + HYBRID_PROBLEMS) if s not in problems]
    with tempfile.TemporaryDirectory(prefix="sass-report-") as workdir:
        jobs = [(s, c, i == 0, workdir) for s in problems for i, c in enumerate(configs_for(s, args.all))]
        if not (args.dry_run or args.hybrid):  # the small layers' two-launch plan, for print_one_launch
            jobs += [(s, two_launch_config(s), False, workdir) for s in SMALL_PROBLEMS]
        if args.jobs > 1:
            with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
                results = list(pool.map(_work, jobs))
        else:
            results = [_work(job) for job in jobs]
    records = [rec for recs in results for rec in recs]
    attach_measurements(records, load_measurements())
    print_table(records)
    print_hybrid_estimates(records)
    print_one_launch(records)
    checks = [c for c in proxy_checks(records) if args.proxy or c[1] != "not compiled"]
    print("\nStatic targets (issues 9, 10 and 20; default configs; plan times are ESTIMATES):")
    for name, value, ok in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1, default=str))
        print(f"wrote {args.json}")
    return 1 if args.proxy and not all(ok or name in KNOWN_MISSES for name, _, ok in checks) else 0
