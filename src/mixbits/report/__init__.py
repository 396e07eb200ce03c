"""mixbits.report"""
