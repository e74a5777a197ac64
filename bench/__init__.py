"""medvlp-bench: the engine (CLI, registries, runner, results, data layer, pretraining loop)."""
from bench.numerics import pin_cpu_numerics

# before any module of the package imports torch: the kernels' ISA is fixed at their first call
pin_cpu_numerics()
