"""The analyzer's inventory: hosts, VMs and vifs from the inventory file and the collectors'
registrations, its history, migrations, SPAN sessions and the collectors' heartbeats.
"""
