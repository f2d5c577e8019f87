"""The store: DuckDB tables and their schema, appends, the one writer thread, rows persisted
from the live path, and queries.
"""
