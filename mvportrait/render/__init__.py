"""mvportrait.render"""
