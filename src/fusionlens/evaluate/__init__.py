"""fusionlens.evaluate"""
