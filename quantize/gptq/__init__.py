"""quantmill.quantize.gptq"""
