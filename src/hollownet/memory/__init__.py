"""Memory: the exact tensor-byte tracker, sizes, and the planner that runs the real code under fake tensors."""
