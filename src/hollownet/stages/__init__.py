"""The five stages, in the order data flows: photos -> pre-compute store -> hollowed training -> LoRA files -> generation."""
