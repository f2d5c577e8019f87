"""Wire formats, sans-I/O: the VN-Tag and E-TAG, and the vspan tunnel (one message, a batch of
messages as numpy columns, a TCP stream).
"""
