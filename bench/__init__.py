"""Benchmark harness for cosyvoice2-mlx: sweeps, results files, baselines and regression checks.

Run as `python -m bench run|compare|list|baseline|micro` (`nox -s bench` calls
`python -m bench run <args>`); see `bench/README.md`. The harness talks to what it
measures through a small interface (`bench.interface.BenchTarget`): our MLX pipeline
(`bench.targets`), the official PyTorch code (`bench.reference`), the mlx-audio-plus
peer in its own virtualenv (`bench.peer`) and a toy MLX workload used to test the
harness itself (`bench.toy`).
"""

import cosyvoice2 as _cosyvoice2  # noqa: F401, E402 - binds MLX to a fast BLAS before anything loads MLX (cosyvoice2.blas)

SCHEMA = "cosyvoice2-mlx-bench/1"
