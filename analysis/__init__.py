"""Turn study records (MLflow runs, Optuna trials) into tidy DataFrames, report tables and plots.

``tables`` ranks configurations and lays out the paper-style ablation and cross-study tables and
writes them as CSV, Markdown and LaTeX; ``plots`` draws parameter importance, parallel coordinates,
learning curves and online-vs-offline probe agreement; ``paper`` holds the only paper numbers the
spec (``docs/amdim-method.md`` section 8) actually gives.
"""
