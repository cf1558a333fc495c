"""The CUDA binary tools on a compiled kernel: resources (cuobjdump -res-usage), kernel parameter offsets
(cuobjdump -elf), and the SASS (nvdisasm) parsed into instructions and loops."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


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
        # CS2R without .32 writes a register pair (CS2R R12, SRZ zeroes R12 and R13)
        pair = "64" in parts or "WIDE" in parts or (parts[0] == "CS2R" and "32" not in parts)
        width = 4 if "128" in parts else 2 if pair else 1
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


def resources(cubin_path: str) -> dict:
    out = subprocess.run([tool("cuobjdump"), "-res-usage", cubin_path], capture_output=True, text=True,
                         check=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    regs, stack, shared, local = (int(g) for g in m.groups())
    return {"regs": regs, "stack": stack, "static_shared": shared, "local": local}


def disassemble(cubin_path: str) -> str:
    return subprocess.run([tool("nvdisasm"), "-c", cubin_path], capture_output=True, text=True, check=True).stdout
