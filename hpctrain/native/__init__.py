"""hpctrain.native"""
