"""``dis demo``: the paper's Table 3 ablation on the synthetic benchmark.

- :mod:`~discli.demo.run`     the stages (benchmark, baseline, fine-tuning per t_tr, bound,
  evaluation, tag scores) and their timings
- :mod:`~discli.demo.jobs`    training runs side by side in worker processes
- :mod:`~discli.demo.report`  ``report.md``, ``report.json``, the figure and the curves
"""
