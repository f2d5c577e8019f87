"""Ingest: tunnel receivers (UDP, TCP), the vectorized validation of messages, and per-
collector accounting of what arrived and what did not.
"""
