"""bench -- side-by-side measurements of this repository's hot paths.

Run each from the repository root as a module, e.g. `python -m bench.rollout --threads 1`.
"""
