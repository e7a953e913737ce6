"""Reliability scenarios (issue 6): real grpcmux processes, faults, load, figures.

Shared by the tests (``tests/test_reliability_*.py``) and the report script
(``benchmarks/reliability.py``): each scenario returns its measured figures and
the tests assert the bounds on them.
"""
