"""mvportrait.data"""
