"""hpctrain.config"""
