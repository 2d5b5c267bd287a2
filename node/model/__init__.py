"""node.model"""
