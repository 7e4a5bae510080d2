"""`emu-edge serve`: the runtime behind an OpenAI-compatible HTTP server (LitServe)."""
