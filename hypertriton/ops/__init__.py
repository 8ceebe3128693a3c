"""The ops: validation, backend dispatch, autograd and the fast PyTorch paths."""
