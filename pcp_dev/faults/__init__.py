"""Fault injection and the randomised fault campaign (`python -m pcp_dev.faults`).

`wrappers` injects faults around the ports and the service, `world` simulates everything
around the real service (trigger, node agents, shepherd, clock), `campaign` draws schedules
and tallies their outcomes. docs/reliability.md explains what each fault tests.
"""
