"""pcp: an event-driven control plane for distributed training on rented GPUs."""

__version__ = "0.1.0"
