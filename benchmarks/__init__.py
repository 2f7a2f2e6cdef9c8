"""The benchmarks of `trl_dpo_ext`: each module a script, run from the repository root as `python -m benchmarks.NAME`.

Every script writes its results through `benchmarks.results_io`; `benchmarks/README.md` lists the scripts and what
they measured.
"""
