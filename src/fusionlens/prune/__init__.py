"""fusionlens.prune"""
