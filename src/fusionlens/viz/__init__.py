"""fusionlens.viz"""
