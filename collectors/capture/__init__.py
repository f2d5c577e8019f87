"""Capture on a hypervisor: AF_PACKET TPACKET_V3 rings on vswitch ports, the kernel's BPF
filters and ours, and the replay of a capture file.
"""
