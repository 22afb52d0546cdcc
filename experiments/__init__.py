"""Experiments that answer the paper's question with this codebase (run as modules)."""
