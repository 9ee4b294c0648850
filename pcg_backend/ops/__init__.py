"""Split ops: the registry, plus pcg's own ops for HF hybrid models and tests."""

from .registry import is_split_op, register_split_op, registered_split_ops, unregister_split_op

__all__ = ["is_split_op", "register_split_op", "registered_split_ops", "unregister_split_op"]
