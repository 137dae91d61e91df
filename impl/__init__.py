"""Optimized attention backends, their kernels and the backend-selection policy.

Never imports ``reference`` (it must stay an independent oracle) or ``attncheck``.
"""
