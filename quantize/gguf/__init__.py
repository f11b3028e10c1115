"""quantmill.quantize.gguf"""
