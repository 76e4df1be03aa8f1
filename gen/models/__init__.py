"""Our diffusion transformers (one file per architecture) and the shared attention entry point."""
