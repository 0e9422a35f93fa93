"""fusionlens.decompose"""
