"""Static sm_90 report of the low-rank kernels, taken on a CPU machine: no GPU needed.

    python bench/sass_report.py                 # default problems, the config the tuner would choose (~2 min)
    python bench/sass_report.py --all           # every "max" candidate of each problem (long)
    python bench/sass_report.py --proxy         # only the three proxy-target problems at M=1; exit 1 if one fails
    python bench/sass_report.py --json PATH     # also write one record per compiled kernel

How: `kernels/launch.py:launch` runs on meta tensors with the kernels' JITFunctions swapped for recorders, so
the grid, arguments and constexprs are the launcher's own. Each recorded launch goes through Triton's own
binder (`create_function_from_signature` + `JITFunction._pack_args`: the constexpr and divisibility
specialization of a real launch, from fake pointers aligned like CUDA allocations) into
`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`. `cuobjdump -res-usage` gives registers,
local memory (spills) and shared memory; `nvdisasm` gives the SASS.

Hot loops are the innermost loops (backward branches) that load weight data. A load is a weight load
when its address traces back (register data flow through the SASS) to a kernel parameter that received
the factor storage (`down` / `up_t`). Per hot loop: SASS instructions per iteration, weight bytes
loaded per thread per iteration, load widths, I2F / SHFL / BAR counts, thread-instructions per weight
byte (= SASS instructions per iteration / weight bytes per thread per iteration), and whether the weight
loads are software-prefetched (their registers are not read in the iteration that loads them).

THE TIME IS AN ESTIMATE from the per-SM model below, not a measurement; where bench/results/<gpu>/
kernels.json (bench/kernel_bench.py) measured the same problem it is printed beside it.
Per kernel, with P programs over S SMs and c = CTAs resident per SM (occupancy, capped by P/S):
  issue  = sum over hot loops of (thread-instructions per weight byte x weight bytes that loop streams
           per SM) / ISSUE_PER_CLK, plus the non-loop instructions of every warp / 4 schedulers
  memory = unique DRAM bytes per SM / min(HBM share per SM, bytes in flight per SM / DRAM latency)
           + weight bytes re-read from L2 / L2 bandwidth,   bytes in flight per SM = c x threads x weight
           bytes per thread per iteration x (2 if prefetched else 1)        (Little's law)
  time   = launch + max(issue, memory) + DRAM latency x (1 + 1 if the kernel has global atomics),
           launch = LAUNCH_US, or PDL_LAUNCH_US for a programmatic dependent launch
A plan of several kernels adds their times.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# ---- H100 SXM per-SM model (stated, not measured; the GPU runs correct it) -------------------------
SMS = 132
CLOCK_GHZ = 1.755  # sustained SM clock under load
HBM_TBS = 3.0  # achievable DRAM bandwidth (3.35 TB/s peak)
L2_TBS = 7.0  # L2 read bandwidth for re-read weight tiles
DRAM_LATENCY_NS = 650.0  # loaded round trip
ISSUE_PER_CLK = 128  # thread-instructions per SM per clock: 4 schedulers x 32 lanes
LAUNCH_US = 2.0  # per kernel under CUDA graphs (issue 9: "a second launch costs about 2 us")
PDL_LAUNCH_US = 0.7  # a programmatic dependent launch: its launch overlaps the previous kernel (a guess)
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_CTAS_PER_SM = 65536, 64, 32
SMEM_PER_SM, SMEM_RESERVED_PER_CTA = 233472, 1024

# ---- problems -------------------------------------------------------------------------------------
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

    def label(self) -> str:
        bits = "fp16" if self.bits is None else f"int{self.bits}" + (f" g{self.group_size}" if self.bits == 4 else "")
        base = f"int{self.base_bits} g{self.base_group_size} + " if self.base_bits else ""
        return f"{self.k}->{self.n} {base}r={self.rank} {bits} M={self.m}"

    def problem(self) -> dict:
        return {"M": self.m, "N": self.n, "K": self.k, "R": self.rank, "bits": self.bits, "group_size": self.group_size,
                "base_bits": self.base_bits, "base_group_size": self.base_group_size}


def spec(m: int, k: int, n: int, bits: int | None, rank: int | None = None) -> Spec:
    return Spec(m, k, n, rank or bench_rank(k, n), bits, INT4_GROUP if bits == 4 else 0)


def hybrid_spec(m: int, k: int, n: int, base_bits: int, rank: int = 32, bits: int | None = 8) -> Spec:
    """The hybrid format of issue 10: a base in groups of 128 (64 where 128 does not divide `in`, as GPT-2 XL's
    1600) plus a rank-`rank` correction (int4 factors: g128)."""
    return Spec(m, k, n, rank, bits, INT4_GROUP if bits == 4 else 0, base_bits, 128 if k % 128 == 0 else 64)


# The proxy targets of issues 9 and 10: default M=1 configs, checked by tests/test_sass_report.py. The hybrid's
# hot loops are held to the limit of what they stream: the base's bits, or the correction's.
PROXY_PROBLEMS = [spec(1, 1600, 6400, 8, 400), spec(1, 4096, 11008, 8, 1024), spec(1, 4096, 11008, 4, 1024),
                  hybrid_spec(1, 4096, 11008, 4)]
IPB_LIMIT = {8: 4.5, 4: 7.0}
# Misses stated in issue 10's note, each with a small share of the plan: the hybrid's correction epilogue (4.69
# insts/B: its per-row loads and pointer steps are spread over 16 bytes per thread) and its phase 1 (r x in bytes,
# too few CTAs to fill the GPU, overlapped with the base under PDL). tests/test_sass_report.py allows exactly these.
KNOWN_MISSES = ("4096->11008 int4 g128 + r=32 int8 M=1: factor loops: insts/weight byte <= 4.5",
                "4096->11008 int4 g128 + r=32 int8 M=1: decode_shrink_kernel >= 2 CTAs/SM or prefetch")
HYBRID_PROBLEMS = [hybrid_spec(m, *LLAMA, base_bits) for base_bits in (4, 3, 2) for m in (1, 16)] + [
    hybrid_spec(4096, *LLAMA, 4), hybrid_spec(1, 768, 3072, 4), hybrid_spec(1, 1600, 6400, 4)]


def default_problems(shapes) -> list[Spec]:
    return [spec(m, k, n, bits) for (k, n) in shapes for bits in (8, 4) for m in M_VALUES]


# ---- recording the launcher ---------------------------------------------------------------------
class FakePointer:
    """What Triton's binder reads from a tensor argument: dtype and an address (CUDA allocations are
    512-byte aligned; a view keeps its byte offset, so the divisibility-by-16 attribute is the real one)."""

    def __init__(self, t):
        self.dtype = t.dtype
        self._address = 512 * 1024 + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._address


@dataclass
class Launch:
    fn: object  # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict
    roles: dict = field(default_factory=dict)  # positional index -> "weight" | "scale" | "x" | "out" | "bias"


def record_launches(s: Spec, config) -> list[Launch]:
    """Run kernels/launch.py on meta tensors with every kernel replaced by a recorder."""
    import torch
    from triton.runtime.jit import JITFunction
    from triton_lowrank.kernels import hybrid_matmul as hybrid
    from triton_lowrank.kernels import launch as launch_mod
    from triton_lowrank.kernels import lowrank_matmul as kern

    from triton_lowrank.core.factors import LowRankFactors
    from triton_lowrank.core.quant import ZERO_POINT_BITS, storage_shapes
    from triton_lowrank.formats.hybrid.storage import HybridWeights

    meta = torch.device("meta")
    storage_dtype = {None: torch.float16, 8: torch.int8, 4: torch.uint8}[s.bits]
    (dr, ds), (ur, us) = storage_shapes(s.rank, s.k, s.bits, s.group_size), storage_shapes(s.rank, s.n, s.bits,
                                                                                              s.group_size)
    f = LowRankFactors(
        torch.empty(dr, dtype=storage_dtype, device=meta),
        None if ds is None else torch.empty(ds, dtype=torch.float32, device=meta),
        torch.empty(ur, dtype=storage_dtype, device=meta),
        None if us is None else torch.empty(us, dtype=torch.float32, device=meta),
        torch.empty(s.n, dtype=torch.float16, device=meta), s.bits, s.group_size)
    x = torch.empty(s.m, s.k, dtype=torch.float16, device=meta)
    out = torch.empty(s.m, s.n, dtype=torch.float16, device=meta)
    roles = {id(f.down): "weight", id(f.up_t): "weight", id(f.down_scale): "scale", id(f.up_t_scale): "scale",
             id(f.bias): "bias", id(x): "x", id(out): "out"}
    weights = None
    if s.base_bits is not None:  # the hybrid layer: f is its correction (the bias is the layer's)
        groups = s.k // s.base_group_size
        zero = torch.empty(s.n, groups, dtype=torch.uint8, device=meta) if s.base_bits in ZERO_POINT_BITS else None
        weights = HybridWeights(torch.empty(s.n, s.k * s.base_bits // 8, dtype=torch.uint8, device=meta),
                                torch.empty(s.n, groups, dtype=torch.float32, device=meta), zero, s.base_bits,
                                s.base_group_size, f._replace(bias=None), f.bias)
        roles.update({id(weights.base): "weight", id(weights.base_scale): "scale", id(zero): "scale"})

    launches: list[Launch] = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                tensor_roles = {i: roles.get(id(a), "workspace") for i, a in enumerate(args)
                                if isinstance(a, torch.Tensor)}
                launches.append(Launch(self.fn, tuple(grid), args, kwargs, tensor_roles))
            return run

    originals = {(module, name): obj for module in (kern, hybrid) for name, obj in vars(module).items()
                 if isinstance(obj, JITFunction)}
    pdl = getattr(launch_mod, "pdl_supported", None)
    try:
        for (module, name), obj in originals.items():
            setattr(module, name, Recorder(obj))
        if pdl is not None:  # what the launcher decides on an sm_90 device
            launch_mod.pdl_supported = lambda x2d: True
        if weights is None:
            launch_mod.launch(x, f, config, out)
        else:
            launch_mod.launch_hybrid(x, weights, config, out)
    finally:
        for (module, name), obj in originals.items():
            setattr(module, name, obj)
        if pdl is not None:
            launch_mod.pdl_supported = pdl
    return launches


# ---- compiling like the JIT ---------------------------------------------------------------------------
def compile_launch(launch: Launch):
    """(compiled kernel, {parameter ordinal: argument index}) for sm_90, specialized by Triton's own binder."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    args = [FakePointer(a) if isinstance(a, torch.Tensor) else a for a in launch.args]
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    # kernel parameters are the non-constexpr arguments, in order (Triton appends scratch pointers after them)
    names = list(signature)
    runtime = [i for i, name in enumerate(names) if signature[name] != "constexpr"]
    return compiled, dict(enumerate(runtime))


# ---- SASS analysis --------------------------------------------------------------------------------
def tool(name: str) -> str | None:
    """cuobjdump / nvdisasm: Triton's NVIDIA backend ships them; else PATH."""
    try:
        import triton.backends.nvidia as nv

        path = Path(nv.__file__).parent / "bin" / name
        if path.exists():
            return str(path)
    except ImportError:
        pass
    return shutil.which(name)


INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
LABEL = re.compile(r"^\s*(\.L_x_\d+):")
TARGET = re.compile(r"`\((\.L_x_\d+)\)")
REG = re.compile(r"\b(U?R\d+)\b")
CBANK = re.compile(r"c\[0x0\]\[(0x[0-9a-f]+)\]")
NO_DEST = ("ST", "RED", "BRA", "BAR", "EXIT", "NOP", "MEMBAR", "FENCE", "ERRBAR", "CCTL", "DEPBAR", "WARPSYNC",
           "BSSY", "BSYNC", "CALL", "RET", "YIELD", "ISETP", "FSETP", "HSETP", "PSETP", "PLOP", "UISETP", "UPLOP",
           "ARRIVES", "SYNCS", "BPT", "JMP", "NANOSLEEP", "BMOV", "VOTE", "R2UR")


@dataclass
class Instr:
    addr: int
    pred: str
    op: str
    operands: list[str]

    @property
    def base(self) -> str:
        return self.op.split(".")[0]

    def dests(self) -> list[str]:
        if self.base.startswith(NO_DEST) or not self.operands:
            return []
        m = re.fullmatch(r"(U?R)(\d+)", self.operands[0].split(".")[0])
        if not m:
            return []
        parts = self.op.split(".")
        width = 4 if "128" in parts else 2 if ("64" in parts or "WIDE" in parts) else 1
        return [f"{m.group(1)}{int(m.group(2)) + i}" for i in range(width)]

    def sources(self) -> list[str]:
        rest = self.operands[1:] if self.dests() else self.operands
        regs = [r for o in rest for r in REG.findall(o.split("desc[")[-1] if "desc[" in o else o)]
        # a 64-bit address [R24.64] reads R24 and R25
        regs += [f"R{int(r[1:]) + 1}" for o in rest for r in re.findall(r"\b(R\d+)\.64", o)]
        return regs

    def load_bits(self) -> int:
        parts = self.op.split(".")
        for bits, names in ((128, ("128",)), (64, ("64",)), (16, ("U16", "S16")), (8, ("U8", "S8"))):
            if any(p in parts for p in names):
                return bits
        return 32


def split_operands(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def parse_sass(text: str) -> tuple[list[Instr], list[tuple[int, int]]]:
    """Instructions in address order and loops as (first index, back-branch index)."""
    instrs: list[Instr] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    branches: list[tuple[int, str]] = []
    for line in text.splitlines():
        lm = LABEL.match(line)
        if lm:
            pending.append(lm.group(1))
            continue
        m = INSTR.search(line)
        if not m:
            continue
        for name in pending:
            labels[name] = len(instrs)
        pending = []
        instr = Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), split_operands(m.group(4)))
        t = TARGET.search(m.group(4))
        if instr.base == "BRA" and t:
            branches.append((len(instrs), t.group(1)))
        instrs.append(instr)
    loops = sorted({(labels[name], i) for i, name in branches if name in labels and labels[name] <= i})
    return instrs, loops


def param_offsets(cubin_path: str) -> dict[int, int]:
    """cbank byte offset -> parameter ordinal, from the cubin's KPARAM_INFO (works for any parameter layout)."""
    elf = subprocess.run([tool("cuobjdump"), "-elf", cubin_path], capture_output=True, text=True, check=True).stdout
    base = 0x210
    m = re.search(r"EIATTR_PARAM_CBANK\s+Format:\s+\S+\s+Value:\s+0x\w+\s+0x([0-9a-f]+)", elf)
    if m:
        base = int(m.group(1), 16) & 0xFFFF
    offsets = {}
    for om in re.finditer(r"Ordinal\s*:\s*0x([0-9a-f]+)\s+Offset\s*:\s*0x([0-9a-f]+)\s+Size\s*:\s*0x([0-9a-f]+)", elf):
        ordinal, offset, size = (int(g, 16) for g in om.groups())
        for byte in range(offset, offset + size, 4):
            offsets[base + byte] = ordinal
    return offsets


class DataFlow:
    """Which kernel parameters an instruction's registers derive from (reaching definitions, approximated
    on the linear SASS: straight back through the loop body, then the previous iteration, then the code before)."""

    def __init__(self, instrs: list[Instr], loops, offsets: dict[int, int]):
        self.instrs, self.loops, self.offsets = instrs, loops, offsets
        self.defs: dict[str, list[int]] = {}
        for i, ins in enumerate(instrs):
            for d in ins.dests():
                self.defs.setdefault(d, []).append(i)

    def _reaching(self, reg: str, pos: int) -> list[int]:
        positions = self.defs.get(reg, [])

        def latest(lo: int, hi: int) -> tuple[list[int], bool]:
            """Definitions in [lo, hi], latest first, up to and including the first unpredicated one."""
            found = []
            for p in sorted((p for p in positions if lo <= p <= hi), reverse=True):
                found.append(p)
                if not self.instrs[p].pred:
                    return found, True
            return found, False

        loop = min((lp for lp in self.loops if lp[0] <= pos <= lp[1]), key=lambda lp: lp[1] - lp[0], default=None)
        if loop is None:
            return latest(0, pos - 1)[0]
        found, killed = latest(loop[0], pos - 1)  # earlier in this iteration
        if killed:
            return found
        # otherwise both the previous iteration's definition and the one before the loop reach (a loop-carried value,
        # e.g. a pointer advanced every iteration)
        return found + latest(pos + 1, loop[1])[0] + latest(0, loop[0] - 1)[0]

    def params(self, regs: list[str], pos: int) -> set[int]:
        out: set[int] = set()
        seen: set[tuple[str, int]] = set()
        work = [(r, pos) for r in regs]
        while work:
            reg, at = work.pop()
            if (reg, at) in seen:
                continue
            seen.add((reg, at))
            for p in self._reaching(reg, at):
                ins = self.instrs[p]
                for o in ins.operands:
                    for c in CBANK.findall(o):
                        if int(c, 16) in self.offsets:
                            out.add(self.offsets[int(c, 16)])
                work.extend((r, p) for r in ins.sources())
        return out


def analyze_sass(text: str, offsets: dict[int, int], roles: dict[int, str]) -> dict:
    instrs, loops = parse_sass(text)
    flow = DataFlow(instrs, loops, offsets)
    weight_ordinals = {o for o, role in roles.items() if role == "weight"}

    def weight_params(i: int) -> set[int]:
        ins = instrs[i]
        address = [r for o in ins.operands[1:] for r in REG.findall(o.split("desc[")[-1].split("]", 1)[-1])]
        address += [f"R{int(r[1:]) + 1}" for o in ins.operands[1:] for r in re.findall(r"\b(R\d+)\.64", o)]
        return flow.params(address, i) & weight_ordinals

    weight_loads = {i: ps for i, ins in enumerate(instrs) if ins.base.startswith("LDG") and (ps := weight_params(i))}
    with_weights = [lp for lp in loops if any(lp[0] <= i <= lp[1] for i in weight_loads)]
    hot = [lp for lp in with_weights
           if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in with_weights)]
    hot_loops = []
    for lo, hi in hot:
        body = [ins for ins in instrs[lo:hi + 1] if ins.base != "NOP"]
        loads = [i for i in range(lo, hi + 1) if i in weight_loads]
        widths: dict[str, int] = {}
        for i in loads:
            widths[instrs[i].op] = widths.get(instrs[i].op, 0) + 1
        weight_bytes = sum(instrs[i].load_bits() for i in loads) / 8
        prefetched = sum(not _read_before_redefined(instrs, i, hi) for i in loads)
        hot_loops.append({
            "sass_instructions": len(body),
            "weight_bytes_per_thread": weight_bytes,
            "instructions_per_weight_byte": round(len(body) / weight_bytes, 3),
            "narrowest_weight_load_bits": min(instrs[i].load_bits() for i in loads),
            "weight_loads": widths,
            "other_loads": sum(ins.base.startswith("LDG") for ins in body) - len(loads),
            "i2f": sum(ins.base.startswith("I2F") for ins in body),
            "shfl": sum(ins.base == "SHFL" for ins in body),
            "bar": sum(ins.base == "BAR" for ins in body),
            "prefetched": prefetched == len(loads),
            "weight_params": sorted(set().union(*(weight_loads[i] for i in loads))),
        })
    in_loops = set().union(*(range(lo, hi + 1) for lo, hi in loops)) if loops else set()
    return {
        "sass_instructions": sum(ins.base != "NOP" for ins in instrs),
        "non_loop_instructions": sum(ins.base != "NOP" for i, ins in enumerate(instrs) if i not in in_loops),
        "global_atomics": sum(ins.base in ("RED", "ATOMG", "ATOM") or ins.base.startswith("REDG") for ins in instrs),
        "hot_loops": hot_loops,
    }


MOVES = ("MOV", "IMAD.MOV.U32", "IMAD.MOV", "UMOV")


def _read_before_redefined(instrs: list[Instr], load: int, end: int) -> bool:
    """Whether the loaded registers are used later in the same iteration (else the load is a prefetch for the
    next one). A register move only carries the value on (the copy is followed, not counted as a use)."""
    live = set(instrs[load].dests())
    for ins in instrs[load + 1:end + 1]:
        read = live & set(ins.sources())
        live -= set(ins.dests())
        if read and ins.op in MOVES:
            live |= set(ins.dests())
        elif read:
            return True
        if not live:
            return False
    return False


def resources(cubin_path: str) -> dict:
    out = subprocess.run([tool("cuobjdump"), "-res-usage", cubin_path], capture_output=True, text=True,
                         check=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    regs, stack, shared, local = (int(g) for g in m.groups())
    return {"regs": regs, "stack": stack, "static_shared": shared, "local": local}


def occupancy(regs: int, warps: int, shared: int) -> int:
    """CTAs per SM an H100 can hold: registers (256-per-warp allocation), warps, shared memory, CTA slots."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * warps)
    by_warps = MAX_WARPS_PER_SM // warps
    by_smem = SMEM_PER_SM // (shared + SMEM_RESERVED_PER_CTA)
    return max(0, min(by_regs, by_warps, by_smem, MAX_CTAS_PER_SM))


# ---- one problem --------------------------------------------------------------------------------------
def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


# How many times a kernel reads each weight byte (programs sharing it along another grid axis), by kernel
# name and weight parameter name. Kernels not listed read each weight byte once.
def rereads(name: str, pname: str, launch: Launch) -> int:
    kw, grid = launch.kwargs, launch.grid
    if name == "fused_kernel":
        return kw["SPLIT_N"] if pname.startswith("down") else kw["SPLIT_K"]
    if name in ("shrink_kernel", "expand_kernel", "hybrid_tile_kernel"):
        return grid[0]  # every M block streams the whole factor (the base)
    if name.startswith("decode_") or name == "hybrid_gemv_kernel":
        return grid[-1]  # every M block streams its factor (the base) once
    return 1


def analyze_launch(s: Spec, launch: Launch, workdir: str) -> dict:
    import torch

    compiled, ordinal_index = compile_launch(launch)
    roles = {o: launch.roles.get(i, "scalar") for o, i in ordinal_index.items()}
    name = launch.fn.__name__
    path = os.path.join(workdir, f"{name}-{os.getpid()}-{id(compiled)}.cubin")
    with open(path, "wb") as fh:
        fh.write(compiled.asm["cubin"])
    try:
        res = resources(path)
        sass = subprocess.run([tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
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
    ctas = occupancy(res["regs"], warps, shared)
    pnames = list(launch.fn.arg_names)
    weight_args = [(pnames[i], a) for i, a in enumerate(launch.args) if launch.roles.get(i) == "weight"]
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
    unique = sum(_tensor_bytes(a) for i, a in enumerate(launch.args)
                 if isinstance(a, torch.Tensor) and launch.roles.get(i) in ("weight", "scale", "x", "out", "bias"))
    record = {
        "kernel": name, "grid": list(launch.grid), "programs": programs, "num_warps": warps,
        "num_stages": getattr(meta, "num_stages", None), "launch_pdl": bool(getattr(meta, "launch_pdl", False)),
        "regs": res["regs"],
        "spills": res["local"] + res["stack"], "shared_bytes": shared, "ctas_per_sm": ctas,
        "resident_ctas_per_sm": min(ctas, programs // SMS) if programs >= SMS else (1 if programs else 0),
        "waves": round(programs / (SMS * max(ctas, 1)), 2), **sass_info,
        "weight_bytes": weight_bytes, "weight_bytes_streamed": streamed, "unique_bytes": unique,
    }
    record["estimate_us"] = estimate_kernel_us(record)
    return record


def estimate_kernel_us(r: dict) -> float:
    """The per-SM model of the module docstring (an estimate)."""
    clock = CLOCK_GHZ * 1e3  # clocks per microsecond
    programs, threads = r["programs"], 32 * r["num_warps"]
    per_sm_programs = math.ceil(programs / SMS)
    share = per_sm_programs / max(programs / SMS, 1e-9) / SMS  # this SM's fraction of the grid's work
    loops = r["hot_loops"]
    issue = r["non_loop_instructions"] * r["num_warps"] * per_sm_programs / 4 / clock
    for loop in loops:
        issue += loop["instructions_per_weight_byte"] * loop["weight_bytes_streamed"] * share / ISSUE_PER_CLK / clock
    resident = max(1, min(r["ctas_per_sm"], per_sm_programs))
    in_flight = max((lp["weight_bytes_per_thread"] * (2 if lp["prefetched"] else 1) for lp in loops), default=0)
    in_flight_sm = resident * threads * max(in_flight, 16.0)
    hbm_share = HBM_TBS * 1e6 / SMS  # bytes per microsecond per SM
    bandwidth = min(hbm_share, in_flight_sm / (DRAM_LATENCY_NS * 1e-3))
    reread = max(0, r["weight_bytes_streamed"] - r["weight_bytes"])
    memory = r["unique_bytes"] * share / bandwidth + reread / (L2_TBS * 1e6)
    serial = DRAM_LATENCY_NS * 1e-3 * (1 + (r["global_atomics"] > 0))
    return round((PDL_LAUNCH_US if r.get("launch_pdl") else LAUNCH_US) + max(issue, memory) + serial, 2)


def report_problem(s: Spec, config, workdir: str) -> list[dict]:
    from dataclasses import asdict

    records = []
    for launch in record_launches(s, config):
        rec = analyze_launch(s, launch, workdir)
        rec["problem"] = s.problem()
        rec["config"] = asdict(config)
        records.append(rec)
    total = round(sum(r["estimate_us"] for r in records), 2)
    for rec in records:
        rec["problem_estimate_us"] = total
    return records


def configs_for(s: Spec, everything: bool) -> list:
    from triton_lowrank.kernels.configs import Problem, candidate_configs, default_config

    p = Problem(s.m, s.n, s.k, s.rank, s.bits, s.group_size, 2, s.base_bits, s.base_group_size)
    return candidate_configs(p, "max") if everything else [default_config(p)]


def _work(job) -> list[dict]:
    s, index, everything, workdir = job
    config = configs_for(s, everything)[index]
    try:
        records = report_problem(s, config, workdir)
        for rec in records:
            rec["default_config"] = index == 0  # candidate_configs puts the heuristic (the tuner's default) first
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


# ---- proxy targets -----------------------------------------------------------------------------------
def proxy_checks(records: list[dict]) -> list[tuple[str, str, bool]]:
    """Issue 9's CPU proxy targets, for the default M=1 configs of the three named problems."""
    checks = []
    for s in PROXY_PROBLEMS:
        recs = [r for r in records if "error" not in r and r.get("default_config", True)
                and r["problem"] == s.problem()]
        name = s.label()
        if not recs:
            checks.append((name, "not compiled", False))
            continue
        loops = [lp for r in recs for lp in r["hot_loops"]]
        def limit(loop: dict, s: Spec = s) -> float:
            return IPB_LIMIT[s.base_bits if "base_ptr" in loop["weight_tensors"] else s.bits]

        checks.append((f"{name}: 0 spills", str(sum(r["spills"] for r in recs)), all(r["spills"] == 0 for r in recs)))
        narrow = min((lp["narrowest_weight_load_bits"] for lp in loops), default=0)
        checks.append((f"{name}: weight loads >= 64 bits", f"{narrow} bits", bool(loops) and narrow >= 64))
        i2f = sum(lp["i2f"] for lp in loops)
        checks.append((f"{name}: no I2F in hot loops", str(i2f), i2f == 0))
        for role, role_loops in (("base", [lp for lp in loops if "base_ptr" in lp["weight_tensors"]]),
                                 ("factor", [lp for lp in loops if "base_ptr" not in lp["weight_tensors"]])):
            if not role_loops:
                continue
            worst = max(role_loops, key=lambda lp: lp["instructions_per_weight_byte"])
            ipb, bound = worst["instructions_per_weight_byte"], limit(worst)
            kind, detail = "", f"{ipb:.2f}"
            if s.base_bits is not None:
                share = sum(lp["weight_bytes_streamed"] for lp in role_loops) / sum(
                    lp["weight_bytes_streamed"] for lp in loops)
                kind, detail = f"{role} loops: ", f"{detail}, {100 * share:.1f}% of the plan's weight bytes"
            checks.append((f"{name}: {kind}insts/weight byte <= {bound}", detail, ipb <= bound))
        for r in recs:
            if not r["hot_loops"]:
                continue
            prefetched = all(lp["prefetched"] for lp in r["hot_loops"])
            share = r["weight_bytes_streamed"] / max(1, sum(x["weight_bytes_streamed"] for x in recs))
            detail = f"{r['resident_ctas_per_sm']} CTA/SM" + (" +prefetch" if prefetched else "") + \
                f", {100 * share:.1f}% of the plan's weight bytes"
            checks.append((f"{name}: {r['kernel']} >= 2 CTAs/SM or prefetch", detail,
                           r["resident_ctas_per_sm"] >= 2 or prefetched))
    return checks


# ---- output ------------------------------------------------------------------------------------------
def print_table(records: list[dict]) -> None:
    head = (f"{'problem':<46} {'path':<7} {'kernel':<22} {'grid':>6} {'regs':>4} {'spill':>5} {'smem':>6} "
            f"{'CTA/SM':>6} | {'loop insts':>10} {'B/thr':>6} {'inst/B':>6} {'loads':<22} {'I2F':>4} {'SHFL':>4} "
            f"{'BAR':>4} {'pf':>2} | {'est us':>7} {'plan est':>8} {'measured':>9}")
    print(head)
    print("-" * len(head))
    for r in records:
        p = r["problem"]
        label = Spec(p["M"], p["K"], p["N"], p["R"], p["bits"], p["group_size"], p.get("base_bits"),
                     p.get("base_group_size", 0)).label()
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
                       f"{lp['instructions_per_weight_byte']:>6.2f} {loads:<22.22} {lp['i2f']:>4} {lp['shfl']:>4} "
                       f"{lp['bar']:>4} {'y' if lp['prefetched'] else 'n':>2}")
            else:
                mid = f" | {'(no hot loop)':>10} {'':>6} {'':>6} {'':<22} {'':>4} {'':>4} {'':>4} {'':>2}"
            right = ""
            if i == 0:
                meas = f"{r['measured_us']:.2f}" if "measured_us" in r else "-"
                right = f" | {r['estimate_us']:>7.2f} {r['problem_estimate_us']:>8.2f} {meas:>9}"
            print(left + mid + right)
    print("\nCTA/SM = occupancy limit / resident for this grid; B/thr = weight bytes per thread per loop iteration; "
          "pf = weight loads prefetched a loop iteration ahead.\nest us = ESTIMATE from the per-SM model in "
          "bench/sass_report.py (H100 SXM constants), not a measurement; plan est = the plan's kernels summed; "
          "measured = bench/results/<gpu>/kernels.json for the same path, where present.")


def print_hybrid_estimates(records: list[dict]) -> None:
    """Issue 10's speed targets, as far as a CPU can speak to them: each hybrid plan's ESTIMATE beside the time the
    same bytes take at HBM_TBS for the base alone (the floor of the kernel without its correction) and for fp16
    weights (cuBLAS F.linear's floor at decode M)."""
    plans = {}
    for r in records:
        p = r["problem"]
        if "error" not in r and p.get("base_bits"):
            plans[json.dumps(p, sort_keys=True)] = (p, r["problem_estimate_us"])
    if not plans:
        return
    print("\nHybrid plans (ESTIMATES; floors = bytes / HBM_TBS):")
    print(f"  {'problem':<46} {'plan est us':>11} {'base floor':>10} {'fp16 floor':>10} {'est/base':>8} "
          f"{'est/fp16':>8}")
    for p, est in plans.values():
        base = p["N"] * p["K"] * p["base_bits"] / 8 + p["N"] * p["K"] // p["base_group_size"] * 4
        fp16 = 2 * p["N"] * p["K"]
        base_us, fp16_us = base / (HBM_TBS * 1e6), fp16 / (HBM_TBS * 1e6)
        label = Spec(p["M"], p["K"], p["N"], p["R"], p["bits"], p["group_size"], p["base_bits"],
                     p["base_group_size"]).label()
        print(f"  {label:<46} {est:>11.2f} {base_us:>10.2f} {fp16_us:>10.2f} {est / base_us:>8.2f} "
              f"{est / fp16_us:>8.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="every 'max' candidate config, not just the default")
    parser.add_argument("--shapes", choices=("default", "all"), default="default",
                        help="default: GPT-2 small c_fc, XL c_fc and c_proj, 4096->11008; all: every GPT-2 layer")
    parser.add_argument("--proxy", action="store_true", help="only the proxy problems; exit 1 if a target fails")
    parser.add_argument("--hybrid", action="store_true", help="only the hybrid problems (with --all: to pick configs)")
    parser.add_argument("--json", type=Path, help="write the records here")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the report compiles for sm_90")
    missing = [t for t in ("cuobjdump", "nvdisasm") if tool(t) is None]
    if missing:
        print(f"SKIP: {', '.join(missing)} not found (Triton's NVIDIA backend ships them)")
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns unless it is set; 1 is the default
    if args.proxy:
        problems = PROXY_PROBLEMS
    elif args.hybrid:
        problems = [s for s in HYBRID_PROBLEMS if s.m == 1 or not args.all]
    else:
        problems = default_problems(DEFAULT_SHAPES if args.shapes == "default" else [*GPT2_SMALL, *GPT2_XL, LLAMA])
        problems += [s for s in PROXY_PROBLEMS + HYBRID_PROBLEMS if s not in problems]
    with tempfile.TemporaryDirectory(prefix="sass-report-") as workdir:
        jobs = [(s, i, args.all, workdir) for s in problems for i in range(len(configs_for(s, args.all)))]
        if args.jobs > 1:
            with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
                results = list(pool.map(_work, jobs))
        else:
            results = [_work(job) for job in jobs]
    records = [rec for recs in results for rec in recs]
    attach_measurements(records, load_measurements())
    print_table(records)
    print_hybrid_estimates(records)
    checks = proxy_checks(records)
    print("\nProxy targets (issues 9 and 10; default M=1 configs):")
    for name, value, ok in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1, default=str))
        print(f"wrote {args.json}")
    return 1 if args.proxy and not all(ok or name in KNOWN_MISSES for name, _, ok in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
