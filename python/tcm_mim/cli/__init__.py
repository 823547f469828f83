"""Command-line tools of tcm_mim."""
