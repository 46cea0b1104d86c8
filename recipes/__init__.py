"""Built-in, shareable hmcl recipes (see `hmcl recipe ls`)."""
