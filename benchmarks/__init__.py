"""vtok's benchmark scripts, run from the repository root as modules: ``python -m benchmarks.NAME``.

Running them as modules keeps this folder off ``sys.path``, so no script name can shadow an installed package
(``benchmarks/kernel_ops.py`` once hid the ``kernels`` package that transformers imports). Each script prints the
exact command that produced its numbers; ``docs/benchmarks.md`` records them. The scripts that train the evaluation
models live in ``scripts/train/`` (``python -m scripts.train.NAME``).
"""
