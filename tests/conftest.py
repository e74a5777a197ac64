"""Imported by pytest before any test module: ``bench`` caps the CPU kernels' ISA (bench.numerics)
before a test computes anything, so tests see the numerics that runs and golden files see."""
import bench  # noqa: F401
