"""Shared ComponentResource plumbing."""

from __future__ import annotations

from collections.abc import Sequence

import pulumi


class PcpComponent(pulumi.ComponentResource):
    """A component whose children all wait for `depends_on` (typically the enabled APIs).

    Pulumi does not make a component's children wait for the component's own dependencies, so
    every child is created with `self.child_opts()`, which parents it and repeats them.
    """

    TYPE = "pcp:infra:Component"

    def __init__(
        self,
        name: str,
        *,
        depends_on: Sequence[pulumi.Resource] = (),
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(self.TYPE, name, None, opts)
        self._deps: list[pulumi.Resource] = list(depends_on)

    def child_opts(
        self,
        *extra_deps: pulumi.Resource,
        ignore_changes: list[str] | None = None,
        delete_before_replace: bool | None = None,
        retain_on_delete: bool | None = None,
    ) -> pulumi.ResourceOptions:
        return pulumi.ResourceOptions(
            parent=self,
            depends_on=[*self._deps, *extra_deps],
            ignore_changes=ignore_changes,
            delete_before_replace=delete_before_replace,
            retain_on_delete=retain_on_delete,
        )
