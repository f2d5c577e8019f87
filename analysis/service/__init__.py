"""The live analyzer: its configuration, the engine thread (ingest, decode, flows), the flow
recorder, the Analyzer component that wires them with the store, ring and inventory, and its
Prometheus metrics.
"""
