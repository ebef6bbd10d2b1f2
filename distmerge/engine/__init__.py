"""The driver (validate → plan → stats → merge → gather) and the executors that run slices."""
