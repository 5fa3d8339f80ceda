"""hpctrain.data"""
