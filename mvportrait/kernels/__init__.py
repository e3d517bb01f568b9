"""mvportrait.kernels"""
