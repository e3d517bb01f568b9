"""mvportrait.train"""
