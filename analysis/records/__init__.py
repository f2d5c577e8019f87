"""Flow records and what is made of them for people: names, orientation, scope; groupings,
rankings, matrices; text, CSV, JSON and Parquet output.
"""
