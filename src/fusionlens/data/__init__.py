"""fusionlens.data"""
