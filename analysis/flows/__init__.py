"""Flows: the flow key, endpoints resolved from tags and the inventory, and the flow table
(compiled) with its per-host clocks and copy pairing.
"""
