"""PyTorch reference of the seed's LoRA, converters, and the parity suite against jax_lora."""
