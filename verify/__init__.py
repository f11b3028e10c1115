"""quantmill.verify"""
