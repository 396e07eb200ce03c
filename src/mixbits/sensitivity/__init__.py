"""mixbits.sensitivity"""
