"""coordinator.discovery"""
