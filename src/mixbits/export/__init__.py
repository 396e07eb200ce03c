"""mixbits.export"""
