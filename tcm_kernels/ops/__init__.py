"""Public ops: boundary checks, back-end choice, and every custom-op registration (schemas of the Triton and
Python back ends, fakes, autograd), all in the ``tcm::`` namespace (docs/architecture.md)."""
