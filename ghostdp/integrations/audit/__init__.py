"""One-run privacy audit (Steinke, Nasr, Jagielski, NeurIPS 2023): canaries, scoring, the run, the report.

``bounds`` and ``guesses`` are torch-free; the public names are re-exported by ``ghostdp.audit``.
"""
