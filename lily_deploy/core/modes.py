"""The routing modes, in one place and free of heavy imports (the CLI's choices read them)."""

MODES = ("batch", "sample", "token", "static")
DYNAMIC_MODES = ("batch", "sample", "token")
