"""Benchmarks that print numbers: ``python -m fastbgm.bench {loader,train,gpu}``.

Every benchmark measures its baseline in the same run and reports ratios against it.
"""
