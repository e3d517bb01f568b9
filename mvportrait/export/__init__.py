"""mvportrait.export"""
