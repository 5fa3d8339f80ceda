"""hpctrain.model"""
