"""fusionlens.models"""
