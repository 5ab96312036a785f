"""The `gencls` command: parses flags, calls flows/ or components/, prints. The top layer: nothing imports it."""
