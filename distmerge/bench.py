"""placeholder replaced below"""
def add_arguments(p): pass
