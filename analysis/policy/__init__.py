"""Port-profiles: loading and binding to VMs, rules, compiled ACLs, and their evaluation over
flow records (verdicts and hits).
"""
