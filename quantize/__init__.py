"""quantmill.quantize"""
