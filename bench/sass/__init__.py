"""The static sm_90 report (bench/sass_report.py), in the order it runs:

- problems.py   which problems and configs: the launcher's own specs, the proxy problems and issue 20's targets
- compile.py    record kernels/launch.py's launches on meta tensors, compile each for sm_90 like the JIT
- disasm.py     cuobjdump / nvdisasm: resources, kernel parameter offsets, SASS parsed into instructions and loops
- hotloops.py   data flow to the weight parameters; per hot loop the instruction mix and the loads in flight
- model.py      the H100 per-SM time model (ESTIMATES): issue bound, HBM floor, Little's-law latency bound, plans
- report.py     one problem end to end, measurements beside estimates, the table, the targets and the CLI
"""
