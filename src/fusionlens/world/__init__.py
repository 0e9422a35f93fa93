"""fusionlens.world"""
