"""The pcp Pulumi program, split into ComponentResources.

`infra/__main__.py` reads the configuration (`config.StackConfig`) and wires the components
defined here. Nothing in this package talks to Google Cloud directly: every cloud object is a
Pulumi resource, so the whole program can be exercised under `pulumi.runtime.set_mocks`.
"""
