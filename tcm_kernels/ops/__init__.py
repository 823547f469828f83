"""Public ops: checks, back-end choice, autograd and fake implementations."""
