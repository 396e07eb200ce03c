"""mixbits.model"""
