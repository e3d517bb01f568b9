"""mvportrait.evaluation"""
