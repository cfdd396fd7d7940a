"""Generated stubs for package fedocr.v1 (regenerate with `make proto`; never edit by hand)."""
