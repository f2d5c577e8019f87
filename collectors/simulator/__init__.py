"""A simulated datacenter: hosts, VMs with daily and weekly traffic rhythms, migrations and
policy breaks, as collector port sources (the demo).
"""
