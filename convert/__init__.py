"""quantmill.convert"""
