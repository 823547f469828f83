"""tcm_mim: thin training package for text-guided masked image modelling (see docs/architecture.md)."""
