"""fusionlens.train"""
