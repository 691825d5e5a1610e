"""Language-model support for the ``jax-lora`` command line: a Flax Llama, its weight and
tokenizer loaders (GGUF, HF safetensors), data, training and generation. Needs the ``[lm]`` extra."""
