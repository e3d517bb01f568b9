"""mvportrait.models"""
