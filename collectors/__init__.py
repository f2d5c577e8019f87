"""The host side: inventory discovery, capture sources, sessions, tagging, forwarding."""
