"""Adapters behind the ports of pcp/core/ports.py: Google Cloud ones and in-memory twins.

Import the module you need (`pcp.adapters.gcs_store`, ...): this package imports nothing, so
loading the in-memory twins never pulls in a Google client library.
"""
