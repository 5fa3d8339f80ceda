"""hpctrain.launch"""
