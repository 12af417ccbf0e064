"""One module per CLI command; each exposes ``command`` (a click.Command) and nothing else of note."""
