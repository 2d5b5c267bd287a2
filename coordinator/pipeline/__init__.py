"""coordinator.pipeline"""
