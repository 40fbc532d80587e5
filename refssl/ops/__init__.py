"""Registered differentiable ops, one family per module.

Every module here calls :func:`refssl.registry.register` at import time; the
registry imports all of them on first use.
"""
