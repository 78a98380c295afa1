"""QMP, QEMU's JSON control protocol: framing (protocol), sessions (server), argument models (schema)
and the command families (commands/)."""
