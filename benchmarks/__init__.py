"""Speed and load measurements (not tests). Each module has a `run_*() -> list[dict]` and a __main__."""
