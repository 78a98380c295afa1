"""Live migration: the source's migration thread, the destination's loader and the stream between them."""
