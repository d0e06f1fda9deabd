"""The local replica of the cloud: emulators, a Compute endpoint, a metadata server, a ticker."""
