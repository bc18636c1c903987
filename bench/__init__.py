"""The benchmarks, each a script (python bench/bench_x.py --help); a package so that tests and benches import one
another as bench.bench_x, through the repository root, and never through each other's folders."""
