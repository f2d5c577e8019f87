"""Forwarding: tagged frames to tunnel messages to the analyzer (UDP or TCP), one forwarder per
route (the analyzer, each SPAN session's destination).
"""
