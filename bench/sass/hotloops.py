"""Hot loops of a kernel's SASS and what they do per iteration.

Hot loops are the innermost loops (backward branches) that load weight data. A load is a weight load when its
address traces back (register data flow through the SASS) to a kernel parameter that received the weight storage
(`down` / `up_t` / the hybrid's base). Per hot loop: SASS instructions per iteration, weight bytes loaded per thread
per iteration, load widths, I2F / SHFL / BAR counts, thread-instructions per weight byte, whether the weight loads are
software-prefetched (their registers not read in the iteration that loads them), and the loads in flight:

  weight_loads_before_first_use: the weight loads outstanding when the iteration first reads a register that a weight
      load wrote (SASS order; a load counts as outstanding from its issue to the first instruction that reads one of
      its registers: the scoreboard stalls there, a register move included). Loads issued in the previous iteration
      and read only in this one (a prefetch) count too: the body is walked twice.
  weight_bytes_in_flight_per_thread: the most weight bytes outstanding at any point of that walk.
  weight_loads_across_iterations: the loads still outstanding at the back edge (read in the next iteration).

Asynchronous copies to shared memory (LDGSTS, Triton's pipelined loads for tl.dot) write no register: the model
counts them in flight for num_stages - 1 iterations instead (async_copies).

A kernel's dependent-launch wait (griddepcontrol.wait: ACQBULK) splits it into the part that may overlap the kernel
before it and the rest; weight loads issued before it and after it are counted, and the bytes per thread of those
issued before it outside any loop (weight_bytes_prefetched_per_thread: a prefetch of the stream that follows the wait).
"""

from __future__ import annotations

import re

from .disasm import CBANK, REG, Instr, parse_sass

WAIT = "ACQBULK"  # griddepcontrol.wait on sm_90


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


def in_flight(instrs: list[Instr], lo: int, hi: int, weight_loads: set[int]) -> tuple[int, int, float, int]:
    """(weight loads outstanding at the first read of a loaded register, the most outstanding at once, the most weight
    bytes outstanding, the loads still outstanding at the back edge) over the loop body [lo, hi] walked twice (the
    second walk is the steady state)."""
    outstanding: dict[int, set[str]] = {}  # load index -> registers it writes
    at_first_use, most, most_bytes = None, 0, 0.0
    for walk in range(2):
        for i in range(lo, hi + 1):
            ins = instrs[i]
            read = set(ins.sources())
            done = [j for j, regs in outstanding.items() if regs & read]
            if walk == 1 and done and at_first_use is None:
                at_first_use = len(outstanding)
            for j in done:
                del outstanding[j]
            written = set(ins.dests())
            for j in [j for j, regs in outstanding.items() if regs <= written]:
                del outstanding[j]  # overwritten unread: no longer waited for
            if i in weight_loads and not ins.pred.startswith("@!PT"):
                outstanding[i] = written
            if walk == 1:
                most = max(most, len(outstanding))
                most_bytes = max(most_bytes, sum(instrs[j].load_bits() / 8 for j in outstanding))
    return (at_first_use if at_first_use is not None else most), most, most_bytes, len(outstanding)


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
    wait = next((i for i, ins in enumerate(instrs) if ins.base == WAIT), None)
    hot_loops = []
    for lo, hi in hot:
        body = [ins for ins in instrs[lo:hi + 1] if ins.base != "NOP"]
        loads = [i for i in range(lo, hi + 1) if i in weight_loads]
        widths: dict[str, int] = {}
        for i in loads:
            widths[instrs[i].op] = widths.get(instrs[i].op, 0) + 1
        weight_bytes = sum(instrs[i].load_bits() for i in loads) / 8
        prefetched = sum(not _read_before_redefined(instrs, i, hi) for i in loads)
        before_use, most, most_bytes, across = in_flight(instrs, lo, hi, set(loads))
        hot_loops.append({
            "sass_instructions": len(body),
            "weight_bytes_per_thread": weight_bytes,
            "instructions_per_weight_byte": round(len(body) / weight_bytes, 3),
            "narrowest_weight_load_bits": min(instrs[i].load_bits() for i in loads),
            "weight_loads": widths,
            "weight_loads_before_first_use": before_use,
            "weight_loads_in_flight": most,
            "weight_bytes_in_flight_per_thread": most_bytes,
            "weight_loads_across_iterations": across,
            "other_loads": sum(ins.base.startswith("LDG") for ins in body) - len(loads),
            "i2f": sum(ins.base.startswith("I2F") for ins in body),
            "shfl": sum(ins.base == "SHFL" for ins in body),
            "bar": sum(ins.base == "BAR" for ins in body),
            "prefetched": prefetched == len(loads),
            "async_copies": all(instrs[i].base == "LDGSTS" for i in loads),
            "after_wait": wait is not None and lo > wait,
            "weight_params": sorted(set().union(*(weight_loads[i] for i in loads))),
        })
    in_loops = set().union(*(range(lo, hi + 1) for lo, hi in loops)) if loops else set()
    return {
        "sass_instructions": sum(ins.base != "NOP" for ins in instrs),
        "non_loop_instructions": sum(ins.base != "NOP" for i, ins in enumerate(instrs) if i not in in_loops),
        "non_loop_instructions_after_wait": 0 if wait is None else sum(
            ins.base != "NOP" for i, ins in enumerate(instrs) if i not in in_loops and i > wait),
        "global_atomics": sum(ins.base in ("RED", "ATOMG", "ATOM") or ins.base.startswith("REDG") for ins in instrs),
        "has_wait": wait is not None,
        "weight_loads_before_wait": 0 if wait is None else sum(i < wait for i in weight_loads),
        "weight_loads_after_wait": 0 if wait is None else sum(i > wait for i in weight_loads),
        "weight_bytes_prefetched_per_thread": 0 if wait is None else sum(
            instrs[i].load_bits() // 8 for i in weight_loads if i < wait and i not in in_loops),
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
