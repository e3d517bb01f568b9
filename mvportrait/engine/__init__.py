"""mvportrait.engine"""
