"""The analyzer's control plane, seen from a collector: registration, sessions, profiles and
heartbeats, kept true across analyzer restarts.
"""
