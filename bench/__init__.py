"""Measurements of the model library: `python -m bench` (or `make bench`). They print figures; they assert nothing.

Each module has `run(args) -> dict` (figures by name) and can run alone: `python -m bench.generation_speed`.
"""
