"""Property-based fuzz suite of every public op and compat shim (issue 19): see docs/robustness.md."""
