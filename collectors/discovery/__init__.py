"""Discovery: which vswitch ports of this host belong to which VM (Linux bridge, Open vSwitch,
libvirt), and their vifs.
"""
