"""coordinator.serving"""
