"""Low-memory modes of stage 2 (and stage 1): quantized frozen weights, streamed weights, layer-major pre-compute."""
