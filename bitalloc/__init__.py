"""bitalloc: mixed-precision bit allocation for LLMs (profile -> solve -> plan.json -> apply -> evaluate)."""
__version__ = "0.1.0"
