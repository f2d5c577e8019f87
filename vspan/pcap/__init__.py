"""Capture files: pcap and pcapng read into frame batches and written from them (compiled
record walks).
"""
