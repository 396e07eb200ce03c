"""mixbits.eval"""
