"""coordinator.recovery"""
