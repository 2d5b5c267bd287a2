"""coordinator.placement"""
