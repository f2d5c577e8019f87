"""The packet ring: recent frames kept on disk with an index, and their export to pcap/pcapng."""
