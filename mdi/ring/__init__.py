"""The ring: partition, nodes file, wire format, auth, node runtime, control plane, starter."""
