"""mvportrait.drivers"""
