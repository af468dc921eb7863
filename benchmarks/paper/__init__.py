"""Reproductions of the variance studies of Soen & Sun (2021, 2024): scripts whose outputs go to ``benchmarks/results``.

* ``fig1_moments.py``: Soen & Sun 2021, Fig. 1 (``K(t) - Var(t)^2`` and ``Var(t)`` against the mean);
* ``mnist_variance.py``: Soen & Sun 2024, the MNIST study (per-layer variances of Î₁ and Î₂ during training).
"""
