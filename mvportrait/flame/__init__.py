"""mvportrait.flame"""
